// Everything a C++ program needs: the all-to-all over either transport and NVSHMEM's bootstrap.
#pragma once

#include "expertwire/all_gather.h"
#include "expertwire/all_to_all.h"
#include "expertwire/config.h"
#include "expertwire/dtype.h"
#include "expertwire/error.h"
#include "expertwire/internode.h"
#include "expertwire/intranode.h"
#include "expertwire/nvshmem.h"
#include "expertwire/params.h"
#include "expertwire/strided.h"
