//! The bundled guest kernels (in progress).
