// Rounding constants of the CPU and CUDA kernels: the one C++ copy of dfqkern.kernels.contract's
// ZETA, GAMMA and SCALE_EPS (Python is the definition; tests/kernels/test_contract.py holds the two
// equal and checks no other C++ / CUDA source re-types them).
#pragma once

namespace dfqkern::rounding {

// AdaRound's rectified sigmoid clamp(sigmoid(V) * kStretch + kGamma, 0, 1), as float32.
constexpr float kZeta = 1.1f;
constexpr float kGamma = -0.1f;
// The reference multiplies by the Python float (ZETA - GAMMA); torch rounds that scalar to fp32.
constexpr float kStretch = static_cast<float>(1.1 - (-0.1));
// The smallest scale qparams_from_range / token_qparams return.
constexpr float kScaleEps = 1e-8f;

}  // namespace dfqkern::rounding
