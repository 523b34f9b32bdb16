/*
 * ephemerald's pause image: the process that holds a pod sandbox's
 * namespaces. Like Kubernetes' own pause, it sleeps until SIGTERM or SIGINT
 * (then exits 0) and reaps any child that is reparented to it, which matters
 * when the pod shares one PID namespace (shareProcessNamespace) and pause is
 * its PID 1.
 *
 * Built by testbed/src/images.rs with `gcc -static -Os`.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

static void on_chld(int sig)
{
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("ephemerald pause 3.10");
        return 0;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term;
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0) {
        return 1;
    }
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) < 0) {
        return 2;
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not pid 1\n");
    }
    for (;;) {
        pause();
    }
}
