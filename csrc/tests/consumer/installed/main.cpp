// Uses the installed headers and library without a GPU: a configuration validated by libexpertwire, its
// errors as expertwire's exceptions, and NVSHMEM's bootstrap state.
#include <expertwire/expertwire.h>

#include <cstdio>
#include <string>

int main() {
  const expertwire::AllToAllConfig config = expertwire::make_config(128, 64, 8, 0, 8, 1, 7168, 7168, 224);
  config.validate();
  expertwire::AllToAllConfig bad = config;
  bad.num_experts = 63;
  try {
    bad.validate();
    std::printf("expertwire consumer: an invalid configuration was accepted\n");
    return 1;
  } catch (const expertwire::ConfigError& error) {
    if (std::string(error.what()).find("num_experts must be divisible by world_size") == std::string::npos) {
      std::printf("expertwire consumer: unexpected message: %s\n", error.what());
      return 1;
    }
  }
  if (expertwire::nvshmem_initialized()) {
    std::printf("expertwire consumer: NVSHMEM reads as initialized before any init\n");
    return 1;
  }
  expertwire::DispatchParams params;
  params.m = 0;
  std::printf("expertwire consumer: ok (%lld local experts, %lld rows each)\n",
              static_cast<long long>(config.num_local_experts()), static_cast<long long>(config.max_recv_tokens()));
  return 0;
}
