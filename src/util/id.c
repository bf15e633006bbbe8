/* See id.h. */
#include "util/id.h"

static bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static bool is_digit(char c) { return c >= '0' && c <= '9'; }

bool id_wellformed(const char *id)
{
    if (!is_alpha(id[0]))
        return false;
    for (const char *p = id + 1; *p; p++)
        if (!is_alpha(*p) && !is_digit(*p) && *p != '-' && *p != '.' && *p != '_')
            return false;
    return true;
}
