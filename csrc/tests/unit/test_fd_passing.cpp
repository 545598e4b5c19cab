// FdMailbox: a descriptor sent from one mailbox arrives in the other as a descriptor of the same open file,
// tagged with the sender's rank; missing peers and silent peers are errors, not hangs.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"
#include "symmem/fd_passing.h"

namespace expertwire {
namespace {

using ::testing::HasSubstr;

struct Pipe {
  UniqueFd read_end, write_end;
  Pipe() {
    int ends[2];
    EXPECT_EQ(pipe(ends), 0);
    read_end = UniqueFd(ends[0]);
    write_end = UniqueFd(ends[1]);
  }
};

TEST(FdMailbox, NamesAreUniquePerMailbox) {
  const FdMailbox a, b;
  EXPECT_NE(a.name(), b.name());
  EXPECT_THAT(a.name(), HasSubstr("expertwire-" + std::to_string(getpid()) + "-"));
}

TEST(FdMailbox, DescriptorArrivesAsTheSameFileWithItsRank) {
  const FdMailbox sender, receiver;
  Pipe pipe;
  sender.send(receiver.name(), /*peer_rank=*/1, /*from_rank=*/3, pipe.write_end.get(), 1000);
  sender.send(receiver.name(), 1, 5, pipe.write_end.get(), 1000);
  FdMailbox::Received first = receiver.receive(1000);
  FdMailbox::Received second = receiver.receive(1000);
  EXPECT_EQ(first.from_rank, 3);
  EXPECT_EQ(second.from_rank, 5);
  ASSERT_GE(first.fd.get(), 0);
  EXPECT_NE(first.fd.get(), pipe.write_end.get());
  EXPECT_NE(first.fd.get(), second.fd.get());

  // Bytes written through the received descriptors come out of the original pipe's read end.
  ASSERT_EQ(write(first.fd.get(), "ew", 2), 2);
  ASSERT_EQ(write(second.fd.get(), "!", 1), 1);
  char got[4] = {};
  ASSERT_EQ(read(pipe.read_end.get(), got, 3), 3);
  EXPECT_EQ(std::string(got), "ew!");
}

// Sends `fd` to the mailbox `name` with an 8-byte payload where a 4-byte rank belongs, as no FdMailbox would.
void send_malformed(const std::string& name, int fd) {
  UniqueFd out(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  ASSERT_GE(out.get(), 0);
  const int64_t payload = 7;
  ASSERT_EQ(send_with_descriptor(out.get(), name, &payload, sizeof(payload), fd), long(sizeof(payload)))
      << std::strerror(errno);
}

TEST(FdMailbox, ARefusedMessageClosesTheDescriptorItCarried) {
  const FdMailbox receiver;
  Pipe pipe;
  send_malformed(receiver.name(), pipe.write_end.get());
  pipe.write_end = UniqueFd();  // the copy in flight is now the pipe's only write end
  try {
    receiver.receive(1000);
    FAIL() << "a malformed message was accepted";
  } catch (const RuntimeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("a message of 8 bytes (not a rank) arrived"));
  }
  // End of file, not "would block": no write end is left open, the received copy included.
  ASSERT_EQ(fcntl(pipe.read_end.get(), F_SETFL, O_NONBLOCK), 0);
  char byte;
  EXPECT_EQ(read(pipe.read_end.get(), &byte, 1), 0) << "the received descriptor leaked (errno " << errno << ")";
}

TEST(FdMailbox, ReceiveTimesOutWhenNothingArrives) {
  const FdMailbox mailbox;
  try {
    mailbox.receive(50);
    FAIL() << "receive returned without a message";
  } catch (const RuntimeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("no memory handle arrived within 50 ms"));
  }
}

TEST(FdMailbox, SendingToAMissingMailboxNamesThePeer) {
  const FdMailbox sender;
  std::string gone;
  {
    const FdMailbox closed;
    gone = closed.name();
  }
  Pipe pipe;
  try {
    sender.send(gone, 6, 0, pipe.write_end.get(), 1000);
    FAIL() << "send to a closed mailbox succeeded";
  } catch (const RuntimeError& error) {
    EXPECT_THAT(error.what(), HasSubstr("to rank 6"));
    EXPECT_THAT(error.what(), HasSubstr("must share a host"));
  }
}

}  // namespace
}  // namespace expertwire
