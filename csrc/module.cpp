// Python entry point of the extension. The kernels register themselves as
// torch.ops.fastpatch_cuda.* from their own files (TORCH_LIBRARY_FRAGMENT); importing this module
// only has to load the shared library for those registrations to run.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpatch CUDA kernels, registered as torch.ops.fastpatch_cuda";
}
