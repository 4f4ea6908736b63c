import ImgfsBlock
import ImgfsFUSE
#if canImport(Glibc)
import Glibc
#endif

/// Checks a mountpoint before anything is opened: an existing directory that is not already an imgfs mount.
enum Mountpoint {
    struct Problem: Error, CustomStringConvertible {
        let description: String
    }

    /// The canonical path to mount on, or why not.
    static func check(_ given: String) -> Result<String, Problem> {
        let dead = Problem(description: "\(given): a FUSE mount whose daemon is gone is still there; remove it " +
                           "with `fusermount3 -u \(given)` (or `umount -l`) first")
        guard let path = PathPolicy.realPath(given) else {
            return .failure(errno == ENOTCONN ? dead : Problem(description: "\(given): mountpoint does not exist"))
        }
        var st = stat()
        guard stat(path, &st) == 0 else {
            return .failure(errno == ENOTCONN ? dead : Problem(description: "\(given): \(String(cString: strerror(errno)))"))
        }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            return .failure(Problem(description: "\(given): mountpoint is not a directory (imgfs shows the image as " +
                                    "a file inside the directory you name)"))
        }
        if MountTable.isImgfsMount(path) {
            return .failure(Problem(description: "\(given): an image is already mounted there; " +
                                    "`imgfs unmount \(given)` first"))
        }
        return .success(path)
    }
}
