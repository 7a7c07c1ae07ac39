/* bnorm_status_string with any int, called from C: there an enum parameter
 * may hold any value of its integer type, which C++ (fuzz_bnorm.cpp) cannot
 * create without undefined behaviour. */
#include "bnorm/bnorm.h"

const char* fuzz_status_string_of_int(int value);

const char* fuzz_status_string_of_int(int value) {
  return bnorm_status_string((bnorm_status)value);
}
