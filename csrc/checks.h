// Small input-check helpers shared by csrc/*.cpp (messages name the function and the argument).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mamlpp {
namespace detail {

// "[2, 6, 3, 3]": formatted here rather than with c10's operator<< for ArrayRef, so that a message
// never depends on that header template matching the library build (it crashed once with a C++
// standard different from torch's).
inline std::string dims(at::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + "]";
}

inline void check_float(const char* fn, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, fn, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_like(const char* fn, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  check_float(fn, name, t);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), " (all must match)");
  TORCH_CHECK(t.device() == ref.device(), fn, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), " (all must be on one device)");
}

inline void check_same_shape(const char* fn, const char* name, const at::Tensor& t,
                             const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), fn, ": ", name, " must have the shape of ", ref_name, " ",
              dims(ref.sizes()), ", got ", dims(t.sizes()));
}

}  // namespace detail
}  // namespace mamlpp
