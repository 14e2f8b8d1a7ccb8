#include "utf8.h"

#include <cstring>

namespace npcd {

long utf8_error_at(const char* s, size_t len, bool nul_is_bad) {
    const auto* p = reinterpret_cast<const unsigned char*>(s);
    size_t i = 0;
    while (i < len) {
        const unsigned char c = p[i];
        int more;
        unsigned long cp;
        if (c < 0x80) {
            if (c == 0 && nul_is_bad) return static_cast<long>(i);
            ++i;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            more = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            more = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            more = 3;
            cp = c & 0x07;
        } else {
            return static_cast<long>(i);
        }
        if (len - i <= static_cast<size_t>(more)) return static_cast<long>(i);
        for (int k = 1; k <= more; ++k) {
            if ((p[i + k] & 0xC0) != 0x80) return static_cast<long>(i);  // also stops at a NUL
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        static const unsigned long kMin[] = {0, 0x80, 0x800, 0x10000};
        // 0xD800..0xDFFF: a UTF-16 surrogate encoded on its own (CESU-8 / WTF-8), never valid UTF-8
        if (cp < kMin[more] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return static_cast<long>(i);
        i += static_cast<size_t>(more) + 1;
    }
    return -1;
}

bool is_utf8(const char* s) {
    return s != nullptr && utf8_error_at(s, std::strlen(s), false) < 0;
}

npcd_status check_string(const char* s, bool required) {
    if (s == nullptr || (required && *s == 0)) return NPCD_ERR_INVALID_ARGUMENT;
    return is_utf8(s) ? NPCD_OK : NPCD_ERR_INVALID_UTF8;
}

thread_local std::string last_error;

void set_last_error(const std::string& message) { last_error = message; }

}  // namespace npcd

extern "C" {

const char* npcd_last_error(void) { return npcd::last_error.c_str(); }

npcd_status npcd_check_utf8(const char* s, uint64_t length) {
    if (s == nullptr && length != 0) {
        npcd::set_last_error("npcd_check_utf8: NULL with a length");
        return NPCD_ERR_INVALID_ARGUMENT;
    }
    const long at = length == 0 ? -1 : npcd::utf8_error_at(s, static_cast<size_t>(length), true);
    if (at < 0) {
        npcd::set_last_error("");
        return NPCD_OK;
    }
    if (s[at] == 0) {
        npcd::set_last_error("an embedded NUL at byte " + std::to_string(at));
        return NPCD_ERR_EMBEDDED_NUL;
    }
    npcd::set_last_error("malformed UTF-8 (or a lone surrogate) at byte " + std::to_string(at));
    return NPCD_ERR_INVALID_UTF8;
}

}
