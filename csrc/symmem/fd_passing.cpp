#include "symmem/fd_passing.h"

#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <random>
#include <utility>

#include "core/error.h"

namespace expertwire {
namespace {

// An abstract-namespace address: a leading NUL, then the name (no file on disk, gone with the socket).
struct AbstractAddress {
  sockaddr_un address{};
  socklen_t length = 0;

  explicit AbstractAddress(const std::string& name) {
    EW_REQUIRE(!name.empty() && name.size() < sizeof(address.sun_path) - 1, "fd passing: socket name '", name,
               "' must be 1..", sizeof(address.sun_path) - 2, " bytes");
    address.sun_family = AF_UNIX;
    std::memcpy(address.sun_path + 1, name.data(), name.size());
    length = socklen_t(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  }
};

void set_timeout(int socket, int option, int timeout_ms) {
  timeval tv{};
  tv.tv_sec = timeout_ms / 1000;
  tv.tv_usec = (timeout_ms % 1000) * 1000;
  if (setsockopt(socket, SOL_SOCKET, option, &tv, sizeof(tv)) != 0) {
    EW_THROW(RuntimeError, "fd passing: setsockopt(timeout) failed: ", std::strerror(errno));
  }
}

}  // namespace

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) close(fd_);
}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.release();
  }
  return *this;
}

FdMailbox::FdMailbox() : socket_(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) {
  if (socket_.get() < 0) EW_THROW(RuntimeError, "fd passing: socket(AF_UNIX) failed: ", std::strerror(errno));
  std::random_device entropy;
  name_ = detail::concat("expertwire-", getpid(), "-", std::hex, (uint64_t(entropy()) << 32) | entropy());
  const AbstractAddress own(name_);
  if (bind(socket_.get(), reinterpret_cast<const sockaddr*>(&own.address), own.length) != 0) {
    EW_THROW(RuntimeError, "fd passing: bind('", name_, "') failed: ", std::strerror(errno));
  }
}

long send_with_descriptor(int socket, const std::string& peer_name, const void* payload, size_t bytes, int fd) {
  const AbstractAddress peer(peer_name);
  iovec data{const_cast<void*>(payload), bytes};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr message{};
  message.msg_name = const_cast<sockaddr_un*>(&peer.address);
  message.msg_namelen = peer.length;
  message.msg_iov = &data;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof(control);
  cmsghdr* rights = CMSG_FIRSTHDR(&message);
  rights->cmsg_level = SOL_SOCKET;
  rights->cmsg_type = SCM_RIGHTS;
  rights->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(rights), &fd, sizeof(int));
  return sendmsg(socket, &message, 0);
}

void FdMailbox::send(const std::string& peer_name, int peer_rank, int32_t from_rank, int fd, int timeout_ms) const {
  set_timeout(socket_.get(), SO_SNDTIMEO, timeout_ms);
  while (send_with_descriptor(socket_.get(), peer_name, &from_rank, sizeof(from_rank), fd) < 0) {
    if (errno == EINTR) continue;
    EW_THROW(RuntimeError, "fd passing: sending a memory handle to rank ", peer_rank, " (socket '", peer_name,
             "') failed: ", std::strerror(errno),
             "; ranks of one intranode group must share a host and its network namespace");
  }
}

FdMailbox::Received FdMailbox::receive(int timeout_ms) const {
  set_timeout(socket_.get(), SO_RCVTIMEO, timeout_ms);
  int32_t from_rank = -1;
  iovec payload{&from_rank, sizeof(from_rank)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr message{};
  message.msg_iov = &payload;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof(control);
  ssize_t got;
  // MSG_TRUNC: the datagram's real length, so that a longer message is not taken for a rank.
  while ((got = recvmsg(socket_.get(), &message, MSG_CMSG_CLOEXEC | MSG_TRUNC)) < 0) {
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      EW_THROW(RuntimeError, "fd passing: no memory handle arrived within ", timeout_ms,
               " ms; a peer rank failed or never got to exchanging its buffer");
    }
    EW_THROW(RuntimeError, "fd passing: recvmsg failed: ", std::strerror(errno));
  }
  // The descriptor is ours as soon as it arrives: owned first, so that a message refused below closes it.
  const cmsghdr* rights = CMSG_FIRSTHDR(&message);
  const bool one_descriptor = rights != nullptr && rights->cmsg_level == SOL_SOCKET &&
                              rights->cmsg_type == SCM_RIGHTS && rights->cmsg_len == CMSG_LEN(sizeof(int));
  int raw_fd = -1;
  if (one_descriptor) std::memcpy(&raw_fd, CMSG_DATA(rights), sizeof(int));
  UniqueFd fd(raw_fd);
  if (got != ssize_t(sizeof(from_rank)) || (message.msg_flags & MSG_CTRUNC) != 0 || !one_descriptor) {
    EW_THROW(RuntimeError, "fd passing: a message of ", got, " bytes ",
             one_descriptor ? "(not a rank)" : "without one descriptor", " arrived");
  }
  return Received{from_rank, std::move(fd)};
}

}  // namespace expertwire
