#pragma once

#include <cstddef>
#include <string>

#include "npcd_client.h"

namespace npcd {

// True for a non-NULL, NUL-terminated, well-formed UTF-8 string.
bool is_utf8(const char* s);

// Where `len` bytes stop being well-formed UTF-8 (a NUL counts as bad when
// nul_is_bad), or -1 when they all are. Surrogates (ED A0..BF xx), overlong
// forms and code points above U+10FFFF are bad.
long utf8_error_at(const char* s, size_t len, bool nul_is_bad);

// The status a string argument gets: INVALID_ARGUMENT for NULL (or "" when a
// value is required), INVALID_UTF8 for malformed text, else OK.
npcd_status check_string(const char* s, bool required);

// The per-thread message behind npcd_last_error().
void set_last_error(const std::string& message);

}  // namespace npcd
