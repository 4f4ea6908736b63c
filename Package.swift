// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "imgfs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "imgfs", targets: ["imgfs"]),
        .library(name: "ImgfsBlock", targets: ["ImgfsBlock"]),
        .library(name: "ImgfsFUSE", targets: ["ImgfsFUSE"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // System libraries: decompression for qcow2 compressed clusters.
        .systemLibrary(name: "CZstd", path: "Sources/CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CDeflate", path: "Sources/CDeflate", pkgConfig: "libdeflate",
                       providers: [.apt(["libdeflate-dev"])]),
        // io_uring: host I/O whose queue depth does not depend on the number of threads.
        .systemLibrary(name: "CUring", path: "Sources/CUring", pkgConfig: "liburing",
                       providers: [.apt(["liburing-dev"])]),
        // The only C in the project: libfuse3's low-level callbacks forwarded to Swift.
        .target(name: "CFuseBridge", path: "Sources/CFuseBridge",
                linkerSettings: [.linkedLibrary("fuse3")]),
        // Block layer: drivers, chains, caches. No FUSE here.
        .target(name: "ImgfsBlock",
                dependencies: ["CZstd", "CDeflate", "CUring", .product(name: "Logging", package: "swift-log")],
                path: "Sources/ImgfsBlock"),
        // FUSE adapter over the block layer.
        .target(name: "ImgfsFUSE",
                dependencies: ["ImgfsBlock", "CFuseBridge", .product(name: "Logging", package: "swift-log")],
                path: "Sources/ImgfsFUSE"),
        // The CLI over both.
        .executableTarget(name: "imgfs",
                          dependencies: ["ImgfsBlock", "ImgfsFUSE",
                                         .product(name: "ArgumentParser", package: "swift-argument-parser"),
                                         .product(name: "Logging", package: "swift-log")],
                          path: "Sources/imgfs"),
        // Helpers both test targets share: running tools without Foundation's Process, seeded random data.
        .target(name: "ImgfsTestSupport", path: "Tests/ImgfsTestSupport"),
        .testTarget(name: "ImgfsBlockTests", dependencies: ["ImgfsBlock", "ImgfsTestSupport"],
                    path: "Tests/ImgfsBlockTests"),
        .testTarget(name: "ImgfsMountTests", dependencies: ["ImgfsBlock", "ImgfsFUSE", "ImgfsTestSupport"],
                    path: "Tests/ImgfsMountTests"),
    ]
)
