/* The CPU's fp32 FMA ceiling: 12 independent FMA chains per thread (enough to cover FMA latency on current x86
 * cores), one OpenMP thread per core, best of 5 runs. Built and run by benchmarks/cpu_ceiling.py:
 *
 *     cc -O2 -fopenmp -mavx512f -DWIDTH=512 fma_peak.c -o fma_peak    (or -mavx2 -mfma -DWIDTH=256)
 *
 * Prints one line: "<threads> <GFLOP/s>". Every chain starts from a different value so that the compiler cannot
 * merge them, and the result is consumed so that it cannot drop them. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#if WIDTH == 512
typedef __m512 V;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define LANES 16
static float hsum(V v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 V;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define LANES 8
static float hsum(V v) {
  float t[8];
  _mm256_storeu_ps(t, v);
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const long iters = 50000000L;
  const int threads = omp_get_max_threads();
  double best = 1e30;
  float sink = 0.0f;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now();
#pragma omp parallel reduction(+ : sink)
    {
      V a[12];
      for (int i = 0; i < 12; ++i) a[i] = SET1(1.0f + 0.1f * i + 0.01f * omp_get_thread_num());
      const V b = SET1(0.999999f), c = SET1(1e-7f);
      for (long i = 0; i < iters; ++i) {
        a[0] = FMA(a[0], b, c); a[1] = FMA(a[1], b, c); a[2] = FMA(a[2], b, c); a[3] = FMA(a[3], b, c);
        a[4] = FMA(a[4], b, c); a[5] = FMA(a[5], b, c); a[6] = FMA(a[6], b, c); a[7] = FMA(a[7], b, c);
        a[8] = FMA(a[8], b, c); a[9] = FMA(a[9], b, c); a[10] = FMA(a[10], b, c); a[11] = FMA(a[11], b, c);
      }
      V s = a[0];
      for (int i = 1; i < 12; ++i) s = ADD(s, a[i]);
      sink += hsum(s);
    }
    const double t = now() - t0;
    if (t < best) best = t;
  }
  printf("%d %.1f\n", threads, (double)iters * 12 * LANES * 2 * threads / best / 1e9);
  return sink == 12345.0f;  /* never true in practice; keeps the chains alive */
}
