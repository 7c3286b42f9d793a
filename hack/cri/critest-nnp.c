/* critest's nonewprivs image stand-in: installed setuid root, prints the effective uid
 * (0 unless no_new_privs kept the setuid bit from working). */
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
