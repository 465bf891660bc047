/*
 * Exports the unprefixed CBLAS GEMM entry points that MLX's CPU backend
 * imports (cblas_sgemm, cblas_dgemm, cblas_cgemm) and forwards them to the
 * OpenBLAS shipped by scipy-openblas32, whose symbols carry a "scipy_" prefix.
 *
 * Loaded with RTLD_GLOBAL before libmlx.so, these definitions come first in
 * the dynamic linker's global lookup scope, so libmlx binds to them instead of
 * the reference BLAS bundled in its wheel.
 *
 * The scipy_cblas_* symbols are deliberately left undefined here: they resolve
 * at load time against libscipy_openblas.so, which must already be loaded
 * with RTLD_GLOBAL. That keeps the build free of any BLAS headers or
 * libraries, and loading fails loudly (instead of binding to the wrong BLAS)
 * if OpenBLAS is missing.
 *
 * The CBLAS enums are passed as int (their ABI on every platform we target);
 * scipy-openblas32 uses 32-bit integers, matching CBLAS's int arguments.
 */

#define SHIM_EXPORT __attribute__((visibility("default")))

void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                       float alpha, const float *a, int lda, const float *b, int ldb,
                       float beta, float *c, int ldc);
void scipy_cblas_dgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                       double alpha, const double *a, int lda, const double *b, int ldb,
                       double beta, double *c, int ldc);
void scipy_cblas_cgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                       const void *alpha, const void *a, int lda, const void *b, int ldb,
                       const void *beta, void *c, int ldc);

SHIM_EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                             float alpha, const float *a, int lda, const float *b, int ldb,
                             float beta, float *c, int ldc) {
    scipy_cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

SHIM_EXPORT void cblas_dgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                             double alpha, const double *a, int lda, const double *b, int ldb,
                             double beta, double *c, int ldc) {
    scipy_cblas_dgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

SHIM_EXPORT void cblas_cgemm(int order, int trans_a, int trans_b, int m, int n, int k,
                             const void *alpha, const void *a, int lda, const void *b, int ldb,
                             const void *beta, void *c, int ldc) {
    scipy_cblas_cgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* A marker so the loader can tell this library from any other "cblas" one. */
SHIM_EXPORT int mlxtune_cblas_shim_version(void) { return 1; }
