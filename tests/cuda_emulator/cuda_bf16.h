// Stand-in for <cuda_bf16.h> on the CPU emulator (see emulator.h).
#pragma once

#include "emulator.h"
