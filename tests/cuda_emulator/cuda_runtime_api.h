// Stand-in for <cuda_runtime_api.h> on the CPU emulator (see emulator.h).
#pragma once

#include "emulator.h"
