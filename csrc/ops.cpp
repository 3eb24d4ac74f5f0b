// dfqkern._C: op registration and argument checks only; the math lives in csrc/cpu and csrc/cuda.
#include <torch/extension.h>

#ifndef DFQKERN_VERSION
#define DFQKERN_VERSION "dev"
#endif

namespace dfqkern {

// What this build contains, so Python can report and choose backends without guessing.
pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = DFQKERN_VERSION;
#ifdef DFQKERN_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace dfqkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dfqkern compiled kernels (CPU; CUDA when built with it)";
  m.def("build_info", &dfqkern::build_info, "Which parts this build of the extension contains");
}
