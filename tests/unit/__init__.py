"""Pure functions and small classes, no engine; the Triton kernels under the interpreter."""
