/* The web server of hack/critest.sh's stand-ins for critest's nginx and httpd images: serves
 * "200 OK" on the port given as argv[1] (default 80), writes its pid to /var/run/nginx.pid and,
 * like nginx's master, shows "nginx: master process" in its command line. Static, no libc
 * beyond what a busybox image needs. */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  const char *port = argc > 1 && argv[1][0] != '-' ? argv[1] : getenv("PORT");
  if (strncmp(argv[0], "nginx: master", 13) != 0) {
    char *args[] = {"nginx: master process nginx -g daemon off;", (char *)port, NULL};
    execv("/proc/self/exe", args);
  }
  int p = port ? atoi(port) : 80;
  FILE *f = fopen("/var/run/nginx.pid", "w");
  if (f) { fprintf(f, "%d\n", getpid()); fclose(f); }
  int s = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(p)};
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) { perror("listen"); return 1; }
  printf("httpd nginx serving on port %d\n", p);
  fflush(stdout);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    char buf[4096];
    ssize_t n = read(c, buf, sizeof buf);
    (void)n;
    const char *r = "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: 22\r\n"
                    "Connection: close\r\n\r\nWelcome to nginx! ok\r\n";
    ssize_t w = write(c, r, strlen(r));
    (void)w;
    close(c);
  }
}
