// Ends what cpu/isa_begin.h started.
#if HEN_ISA_LEVEL >= 2 && defined(__clang__)
#pragma clang attribute pop
#elif HEN_ISA_LEVEL >= 2
#pragma GCC pop_options
#endif
