/* An LD_PRELOAD shim that makes fsync/fdatasync of a SQLite write-ahead log fail with EIO, what the
 * kernel returns when writeback of the file's dirty pages failed (and it then marks them clean).
 *
 * While the file named by env RG_FAULT_TRIGGER exists, fsync(fd) and fdatasync(fd) on a descriptor
 * whose path (readlink /proc/self/fd/N) ends in "-wal" return -1 / EIO without calling the real
 * function. Every fsync, fdatasync and ftruncate is appended to the file named by env RG_FAULT_LOG
 * as one line "<call> <path> <result>" (ftruncate: "ftruncate <path> <length> <result>"), written
 * with one write() on an O_APPEND descriptor so that the lines of several threads and processes
 * never interleave. Built by tests/support/fsync_fault.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static void fd_path(int fd, char *out, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, size - 1);
    if (n < 0) n = 0;
    out[n] = '\0';
}

static int is_wal(const char *path) {
    size_t n = strlen(path);
    return n >= 4 && strcmp(path + n - 4, "-wal") == 0;
}

static int triggered(void) {
    const char *trigger = getenv("RG_FAULT_TRIGGER");
    return trigger != NULL && access(trigger, F_OK) == 0;
}

static void record(const char *line, size_t len) {
    const char *name = getenv("RG_FAULT_LOG");
    if (name == NULL) return;
    int saved = errno;
    int fd = open(name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
        ssize_t ignored = write(fd, line, len);
        (void)ignored;
        close(fd);
    }
    errno = saved;
}

static int sync_call(const char *name, int fd) {
    char path[4096], line[4200];
    fd_path(fd, path, sizeof path);
    int result;
    if (is_wal(path) && triggered()) {
        result = -1;
        errno = EIO;
    } else {
        int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);
        result = real(fd);
    }
    int saved = errno;
    int len = snprintf(line, sizeof line, "%s %s %d\n", name, path, result);
    record(line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
    errno = saved;
    return result;
}

int fsync(int fd) { return sync_call("fsync", fd); }

int fdatasync(int fd) { return sync_call("fdatasync", fd); }

static int truncate_call(const char *name, int fd, off_t length) {
    char path[4096], line[4200];
    fd_path(fd, path, sizeof path);
    int (*real)(int, off_t) = (int (*)(int, off_t))dlsym(RTLD_NEXT, name);
    int result = real(fd, length);
    int saved = errno;
    int len = snprintf(line, sizeof line, "ftruncate %s %lld %d\n", path, (long long)length, result);
    record(line, (size_t)len < sizeof line ? (size_t)len : sizeof line - 1);
    errno = saved;
    return result;
}

/* SQLite's unix VFS calls ftruncate64 (64-bit off_t), Python's os.ftruncate ftruncate. */
int ftruncate(int fd, off_t length) { return truncate_call("ftruncate", fd, length); }

int ftruncate64(int fd, off_t length) { return truncate_call("ftruncate64", fd, length); }
