// Reading / writing float32, float16 and bfloat16 tensors as fp32 chunks (portable drivers only).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

namespace dfqkern::cpu {

inline FType ftype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FType::f32;
    case at::kHalf: return FType::f16;
    case at::kBFloat16: return FType::bf16;
    default: TORCH_CHECK_TYPE(false, "expected a float32, float16 or bfloat16 tensor, got ", t.scalar_type());
  }
}

// A float tensor read chunk by chunk as fp32 (converted into a caller buffer unless already fp32).
struct In {
  const void* p;
  FType t;
  explicit In(const at::Tensor& c) : p(c.data_ptr()), t(ftype_of(c)) {}
  const float* get(int64_t off, int64_t n, float* buf) const {
    switch (t) {
      case FType::f32: return static_cast<const float*>(p) + off;
      case FType::f16: {
        auto s = static_cast<const c10::Half*>(p) + off;
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(s[i]);
        return buf;
      }
      default: {
        auto s = static_cast<const c10::BFloat16*>(p) + off;
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(s[i]);
        return buf;
      }
    }
  }
};

// A float output written chunk by chunk: fp32 in place, else through a buffer converted on commit.
struct Out {
  void* p;
  FType t;
  explicit Out(at::Tensor& c) : p(c.data_ptr()), t(ftype_of(c)) {}
  float* ptr(int64_t off, float* buf) const { return t == FType::f32 ? static_cast<float*>(p) + off : buf; }
  void commit(int64_t off, int64_t n, const float* buf) const {
    if (t == FType::f16) {
      auto d = static_cast<c10::Half*>(p) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(buf[i]);
    } else if (t == FType::bf16) {
      auto d = static_cast<c10::BFloat16*>(p) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(buf[i]);
    }
  }
};

}  // namespace dfqkern::cpu
