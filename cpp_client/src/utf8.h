#pragma once

namespace npcd {

// True for a non-NULL, NUL-terminated, well-formed UTF-8 string.
bool is_utf8(const char* s);

}  // namespace npcd
