/* uds-send PATH: connects to the Unix socket PATH, writes stdin to it, then prints what comes
 * back until the peer closes or stays silent for 3 s. The e2e suites use it to throw raw bytes
 * (garbage, malformed frames) at a VM's vsock socket, which busybox's tools cannot do. */
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: uds-send PATH <BYTES\n");
        return 2;
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
        perror("uds-send: connect");
        return 1;
    }
    char buf[65536];
    ssize_t n;
    while ((n = read(0, buf, sizeof(buf))) > 0)
        if (write(fd, buf, n) != n) break;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    while (poll(&p, 1, 3000) > 0 && (n = read(fd, buf, sizeof(buf))) > 0)
        fwrite(buf, 1, n, stdout);
    return 0;
}
