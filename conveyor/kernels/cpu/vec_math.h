// Scalar math shared by Conveyor's CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace conveyor {

// e^x, relative error about 1e-7 for x in [-87, 88] (clamped outside): x = k ln2 + r, |r| <= ln2 / 2, e^r by its
// Taylor series to r^7, 2^k built in the exponent bits. Vectorizes, unlike expf.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = std::fma(k, -0.693145751953125f, x);
  r = std::fma(k, -1.428606765330187e-06f, r);
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

}  // namespace conveyor
