// What the host half of the high-throughput all-to-all hands a transport to launch.
#pragma once

#include "device/ht_args.h"
#include "expertwire/high_throughput.h"

namespace expertwire {

struct HighThroughputAllToAll::Launch {
  device::HtArgs args;
  LaunchShape shape;
};

}  // namespace expertwire
