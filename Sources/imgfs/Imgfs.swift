import ArgumentParser

/// The `imgfs` command: mount disk images as flat raw files.
@main
struct Imgfs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "imgfs",
        abstract: "Show disk images (qcow2, raw) as flat raw files through FUSE.",
        discussion: """
            imgfs mount disk.qcow2 /mnt/x     # /mnt/x/disk.raw is the guest's disk, byte for byte
            mount -o loop /mnt/x/disk.raw /mnt/guest
            imgfs unmount /mnt/x
            """,
        subcommands: [MountCommand.self, UnmountCommand.self, InfoCommand.self, CheckCommand.self])
}

/// Exit statuses that tell a script what kind of failure happened.
enum ExitStatus {
    /// The image is unreadable, invalid or refused.
    static let imageError = ExitCode(65)
    /// The mount itself failed (FUSE, mountpoint, permissions).
    static let mountError = ExitCode(71)
}
