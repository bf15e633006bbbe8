/* QEMU's rule for ids and node names (id_wellformed): a letter, then
 * letters, digits, '-', '.' and '_'. */
#pragma once
#include <stdbool.h>

bool id_wellformed(const char *id);
