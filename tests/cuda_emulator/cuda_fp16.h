// Stand-in for <cuda_fp16.h> on the CPU emulator (see emulator.h).
#pragma once

#include "emulator.h"
