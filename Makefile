# imgfs: the two set-up commands are `make demo` and `make test`; both install what they need first.
SWIFT ?= swift

.PHONY: all deps build release test demo bench clean

all: build

deps:
	tools/install-deps

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build -c release

# Builds, then runs every test (mount tests need /dev/fuse and root or fusermount3): once with the host I/O
# engine chosen at start (io_uring where the kernel allows it), once with the thread-pool fallback forced.
test: deps
	$(SWIFT) build
	$(SWIFT) test
	IMGFS_IO_ENGINE=threads $(SWIFT) test

# Builds imgfs, makes a small qcow2 with an ext4 file system and a snapshot, mounts it and shows it.
demo: deps
	$(SWIFT) build
	tools/demo

# imgfs vs qemu-storage-daemon's FUSE export vs the raw file, with fio (see tools/bench --help).
bench: deps
	tools/bench

clean:
	rm -rf .build
