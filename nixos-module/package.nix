# organixm's Python package (the organixmd daemon and the organixctl client),
# built from this repository. Used with callPackage:
#
#   pkgs.callPackage ./nixos-module/package.nix { }
{
  lib,
  python3Packages,
  e2fsprogs,
  gptfdisk,
  dosfstools,
  mtools,
  util-linux,
  grub2,
  grub2_efi,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
in
python3Packages.buildPythonApplication {
  pname = "organixm";
  # One version, kept in pyproject.toml.
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel is built from: a change to the tests, the docs or
  # this directory does not rebuild the package (or every image using it).
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      (lib.fileset.maybeMissing ../README.md)
      (lib.fileset.maybeMissing ../LICENSE)
      ../organixmd
      ../organixctl
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = [
    python3Packages.aiohttp
    python3Packages.aiobotocore
    python3Packages.pydantic
    python3Packages.structlog
    python3Packages.zstandard
    python3Packages.cryptography
    python3Packages.systemd
    python3Packages.xxhash
  ];

  # `organixctl provision` partitions and formats a disk and installs GRUB.
  # The tools go at the end of PATH so that an administrator's own tools,
  # when present, are the ones used.
  makeWrapperArgs = [
    "--suffix"
    "PATH"
    ":"
    (lib.makeBinPath [
      e2fsprogs
      gptfdisk
      dosfstools
      mtools
      util-linux
      grub2
    ])
    # GRUB's module directories live in the store, not in /usr/lib/grub.
    "--set-default"
    "ORGANIXM_GRUB_BIOS_DIR"
    "${grub2}/lib/grub/i386-pc"
    "--set-default"
    "ORGANIXM_GRUB_EFI_DIR"
    "${grub2_efi}/lib/grub/x86_64-efi"
  ];

  # The test suite needs root, loop devices, an S3 server and QEMU; it runs
  # in the project's CI (`make test`), not in the build sandbox. The import
  # check still proves that every runtime dependency resolves.
  doCheck = false;
  pythonImportsCheck = [
    "organixmd"
    "organixctl"
  ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.isc;
    platforms = lib.platforms.linux;
    mainProgram = "organixctl";
  };
}
