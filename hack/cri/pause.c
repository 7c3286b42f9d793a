/* The pod sandbox's process for the CRI tests: holds the pod's namespaces, reaps the
 * children it inherits (it is PID 1 of a pod that shares its PID namespace) and exits 0 on
 * SIGINT or SIGTERM. Linked statically into a one-file image by hack/make-pause-image.py. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>

int main(int argc, char **argv) {
    (void)argv;
    if (argc > 1) {
        fputs("pause takes no arguments\n", stderr);
        return 2;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
        perror("pause: sigprocmask");
        return 1;
    }
    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig == SIGINT || sig == SIGTERM)
            return 0;
        if (sig == SIGCHLD)
            while (waitpid(-1, NULL, WNOHANG) > 0)
                ;
    }
}
