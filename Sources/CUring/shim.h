// liburing.h defines _XOPEN_SOURCE and _GNU_SOURCE before its own includes. Were the libc headers parsed under
// those, their structs (fd_set, ...) would differ from Swift's Glibc module; including them first, under the
// defaults Glibc was built with, keeps one definition.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <inttypes.h>
#include <time.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <liburing.h>
