/* What the AVX2 block kernels (q8_rows.c, q4_rows.c, q4_i8_rows.c) need of the CPU, checked at run time: the
 * kernels are compiled for AVX2, FMA and F16C whatever the build machine, and run only where all three exist. The
 * int8-row kernels also carry a copy compiled for AVX-512 VNNI, run where the CPU has it. */
#ifndef MINERCORE_CPU_FEATURES_H
#define MINERCORE_CPU_FEATURES_H

#if defined(__x86_64__) && defined(__GNUC__)
#define MC_X86 1
#endif

/* 1 where this CPU has AVX2, FMA and F16C, else 0. */
static inline int mc_cpu_has_avx2_fma_f16c(void) {
#ifdef MC_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* 1 where this CPU also has AVX-512 VNNI on 256-bit vectors (AVX512_VNNI and AVX512VL), else 0. */
static inline int mc_cpu_has_avx512_vnni(void) {
#ifdef MC_X86
    __builtin_cpu_init();
    return mc_cpu_has_avx2_fma_f16c() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

#endif
