#include "utf8.h"

namespace npcd {

bool is_utf8(const char* s) {
    if (s == nullptr) return false;
    const auto* p = reinterpret_cast<const unsigned char*>(s);
    while (*p != 0) {
        const unsigned char c = *p;
        int more;
        unsigned long cp;
        if (c < 0x80) {
            ++p;
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
            return false;
        }
        ++p;
        for (int i = 0; i < more; ++i, ++p) {
            if ((*p & 0xC0) != 0x80) return false;  // also stops at the NUL
            cp = (cp << 6) | (*p & 0x3F);
        }
        static const unsigned long kMin[] = {0, 0x80, 0x800, 0x10000};
        if (cp < kMin[more] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    }
    return true;
}

}  // namespace npcd
