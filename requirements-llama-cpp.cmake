# How llama-cpp-python compiles llama.cpp here: only what its Python bindings load. CMake includes this
# file right after llama.cpp's project() call (the Makefile and the llm-api Dockerfile pass
# -DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>). llama-cpp-python turns on llama.cpp's "common" library
# (argument parsing, downloads, chat templates, an HTTP client) and the multimodal library (mtmd, for
# llava), which our server never loads: the normal variable hides the first's cache setting, and the
# cache entry turns off the second (llama-cpp-python reads it after llama.cpp is configured). That more
# than halves the compile (5.0 to 2.1 minutes on 2 cores, measured). Drop the flag to build as upstream.
set(LLAMA_BUILD_COMMON OFF)
set(LLAVA_BUILD OFF CACHE BOOL "llama-cpp-python: build the mtmd (llava) library" FORCE)
