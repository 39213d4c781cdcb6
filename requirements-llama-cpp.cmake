# Included by CMake right after llama.cpp's project() call when llama-cpp-python compiles it
# (the Makefile passes -DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>). llama-cpp-python turns on
# llama.cpp's "common" library (argument parsing, downloads, chat templates, an HTTP client), which
# its Python bindings never load: this normal variable hides that cache setting, so neither it nor
# cpp-httplib is compiled. That and LLAVA_BUILD=OFF more than halve the compile (5.0 to 2.1 minutes
# on 2 cores, measured). Delete this file's use to build llama-cpp-python as upstream does.
set(LLAMA_BUILD_COMMON OFF)
