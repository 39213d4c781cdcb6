# How llama-cpp-python compiles llama.cpp here: only what its Python bindings load. CMake includes this
# file right after llama.cpp's project() call (the Makefile and the llm-api Dockerfile pass
# -DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>). llama-cpp-python turns on llama.cpp's "common" library
# (argument parsing, downloads, chat templates, an HTTP client) and the multimodal library (mtmd, for
# llava), which our server never loads: the normal variable hides the first's cache setting, and the
# cache entry turns off the second (llama-cpp-python reads it after llama.cpp is configured). That more
# than halves the compile (5.0 to 2.1 minutes on 2 cores, measured). Drop the flag to build as upstream.
set(LLAMA_BUILD_COMMON OFF)
set(LLAVA_BUILD OFF CACHE BOOL "llama-cpp-python: build the mtmd (llava) library" FORCE)

# No AMX kernels. On a CPU with AMX (Intel Xeon 4th generation and later), -march=native would compile
# ggml's AMX path, and llama.cpp then repacks quantized weights (Q4_0, Q4_1, Q8_0, Q4_K...) into its
# "AMX" buffer type, whose matmul crashes the process in llama_decode (SmolLM2's Q4_1 GGUF on a 2-vCPU
# Xeon; upstream: ggml-org/llama.cpp#20824, open and unfixed). An explicit -mno-amx-* wins over
# -march=native whatever the order (GCC and Clang), so the AMX code is simply not built; the AVX-512
# and AVX2 kernels and llama.cpp's CPU_REPACK layouts still are. On a CPU without AMX nothing changes.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$" AND NOT MSVC)
    set(GGML_AMX_TILE OFF CACHE BOOL "ggml: enable AMX-TILE" FORCE)
    set(GGML_AMX_INT8 OFF CACHE BOOL "ggml: enable AMX-INT8" FORCE)
    set(GGML_AMX_BF16 OFF CACHE BOOL "ggml: enable AMX-BF16" FORCE)
    string(APPEND CMAKE_C_FLAGS " -mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
    string(APPEND CMAKE_CXX_FLAGS " -mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
endif()
