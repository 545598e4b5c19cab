// Passing file descriptors between the processes of one host: a Unix datagram socket in the abstract namespace
// carries each descriptor with SCM_RIGHTS, so the receiver gets its own descriptor of the same open file.
// CUDA exports physical memory as such a descriptor (CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace expertwire {

// A descriptor this process owns, closed when it goes away.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd();
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_ = -1;
};

// Sends one datagram of `bytes` bytes from `payload`, carrying `fd`, from `socket` to the mailbox named
// `peer_name` (FdMailbox::name). Returns sendmsg's result: the bytes sent, or -1 with errno set.
long send_with_descriptor(int socket, const std::string& peer_name, const void* payload, size_t bytes, int fd);

// One bound socket per process. Its name is unique on the host (pid and a random nonce), so jobs sharing a
// host never see each other's messages; send it to the peers by any means (an all_gather).
class FdMailbox {
 public:
  // Throws RuntimeError when the socket cannot be created or bound.
  FdMailbox();
  const std::string& name() const { return name_; }

  // Sends `fd` tagged with `from_rank` to the mailbox named `peer_name`. Throws RuntimeError naming the peer
  // when it is not reachable (no such mailbox on this host, or it did not take the message within timeout_ms).
  void send(const std::string& peer_name, int peer_rank, int32_t from_rank, int fd, int timeout_ms) const;

  // The next descriptor that arrives, and the rank its sender tagged it with. Throws RuntimeError when none
  // arrives within timeout_ms.
  struct Received {
    int32_t from_rank;
    UniqueFd fd;
  };
  Received receive(int timeout_ms) const;

 private:
  UniqueFd socket_;
  std::string name_;
};

}  // namespace expertwire
