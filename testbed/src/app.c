/*
 * ephemerald's "distroless" app image: the only file in the image. It prints
 * one line at start, then sleeps until SIGTERM or SIGINT and exits 0, so that
 * stopping it is quick. With no shell in the image, the only way to look
 * inside is an ephemeral debug container that shares its PID namespace.
 *
 * Built by testbed/src/images.rs with `gcc -static -Os`.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void on_term(int sig)
{
    (void)sig;
    static const char msg[] = "app: stopping\n";
    (void)!write(1, msg, sizeof(msg) - 1);
    _exit(0);
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_term;
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0) {
        return 1;
    }
    printf("app: started, pid %d\n", (int)getpid());
    fflush(stdout);
    for (;;) {
        pause();
    }
}
