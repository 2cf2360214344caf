# Builders of an organixm host, under config.system.build.organixm:
#
#   rootImage     raw ext4 root image: the system closure, the mount points
#                 of readonly-root.nix, extraRootFiles, /organixm/boot.env
#   release       `organixctl publish` into a directory: NAME.meta and the
#                 compressed image, unsigned (no secret key enters the store)
#   publish       script: organixm-publish --secret-key PATH [...] uploads
#                 rootImage to services.organixm.image.publishTo, signed
#   installerIso  installation ISO that provisions the first disk with the
#                 bundled release, then powers off
#   bootEnv       the GRUB environment file GRUB reads from the slot
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:

let
  cfg = config.services.organixm;
  icfg = cfg.image;

  toplevel = config.system.build.toplevel;

  # The boot entry, as paths inside the slot's file system. GRUB loads the
  # kernel and initrd from the slot it chose and appends organixm.slot=.
  kernel = "${config.boot.kernelPackages.kernel}/${config.system.boot.loader.kernelFile}";
  initrd = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}";
  init = "${toplevel}/init";
  params = config.boot.kernelParams;

  # A release id that stays the same for the same system: rebuilding an
  # unchanged configuration does not make a "new" release.
  derivedUuid =
    let
      h = builtins.hashString "sha256" (builtins.unsafeDiscardStringContext toplevel.outPath);
    in
    lib.concatStringsSep "-" [
      (builtins.substring 0 8 h)
      (builtins.substring 8 4 h)
      (builtins.substring 12 4 h)
      (builtins.substring 16 4 h)
      (builtins.substring 20 12 h)
    ];

  # GRUB reads organixm_kernel, organixm_initrd, organixm_init and
  # organixm_params from here (load_env), so its format is GRUB's own.
  bootEnv =
    pkgs.runCommand "organixm-boot.env"
      {
        nativeBuildInputs = [ pkgs.grub2 ];
      }
      ''
        grub-editenv "$out" create
        grub-editenv "$out" set \
          ${lib.escapeShellArg "organixm_kernel=${kernel}"} \
          ${lib.escapeShellArg "organixm_initrd=${initrd}"} \
          ${lib.escapeShellArg "organixm_init=${init}"} \
          ${lib.escapeShellArg "organixm_params=${lib.concatStringsSep " " params}"}
      '';

  # /bin/sh and /usr/bin/env are links in the image (readonly-root.nix); this
  # keeps their targets in the image's store even when nothing else refers
  # to them.
  rootLinks = pkgs.writeText "organixm-root-links" (
    lib.concatStringsSep "\n" (
      [ config.environment.binsh ] ++ lib.optional (config.environment.usrbinenv != null) config.environment.usrbinenv
    )
  );

  ext4Image = pkgs.callPackage (modulesPath + "/../lib/make-ext4-fs.nix") {
    storePaths = [
      toplevel
      rootLinks
    ];
    volumeLabel = icfg.volumeLabel;
    populateImageCommands = ''
      ${config.services.organixm.readOnlyRoot.populateCommands}
      mkdir -p files/organixm
      cp ${bootEnv} files/organixm/boot.env
    '';
  };

  ownedFiles = lib.filter (f: f.user != "root" || f.group != "root") icfg.extraRootFiles;

  # make-ext4-fs builds under fakeroot, so everything in the image belongs to
  # root; owners other than root are set afterwards, by number (the image
  # has no passwd to resolve names against).
  ownershipCommands = lib.concatMapStrings (
    file:
    let
      uid = toString config.users.users.${file.user}.uid;
      gid = toString config.users.groups.${file.group}.gid;
    in
    ''
      {
        printf 'sif "%s" uid ${uid}\nsif "%s" gid ${gid}\n' ${lib.escapeShellArg file.target} ${lib.escapeShellArg file.target}
        if [ -d ${lib.escapeShellArg "${file.source}"} ]; then
          find ${lib.escapeShellArg "${file.source}"} -mindepth 1 -printf '%P\n' | while read -r entry; do
            printf 'sif "%s/%s" uid ${uid}\nsif "%s/%s" gid ${gid}\n' ${lib.escapeShellArg file.target} "$entry" ${lib.escapeShellArg file.target} "$entry"
          done
        fi
      } >> debugfs.commands
    ''
  ) ownedFiles;

  rootImage =
    if ownedFiles == [ ] then
      ext4Image
    else
      pkgs.runCommand "organixm-root.img" { nativeBuildInputs = [ pkgs.e2fsprogs ]; } ''
        cp --reflink=auto ${ext4Image} "$out"
        chmod u+w "$out"
        : > debugfs.commands
        ${ownershipCommands}
        debugfs -w -f debugfs.commands "$out" 2> debugfs.log
        # debugfs exits 0 even when a command fails.
        if grep -q 'set_inode_field:' debugfs.log; then
          cat debugfs.log >&2
          echo "organixm: could not set the owner of an extraRootFiles entry" >&2
          exit 1
        fi
      '';

  # Refuses an image larger than the slots it must fit in.
  sizeCheck = lib.optionalString (icfg.maxSize != null) ''
    size=$(stat -L -c %s ${rootImage})
    if [ "$size" -gt ${toString (icfg.maxSize * 1024 * 1024)} ]; then
      echo "organixm: the root image is $size bytes, more than services.organixm.image.maxSize (${toString icfg.maxSize} MiB)" >&2
      exit 1
    fi
  '';

  sourceSettings = cfg.settings.source;

  releaseArgs = lib.escapeShellArgs (
    [
      "--version"
      icfg.version
      "--serial"
      (toString icfg.serial)
      "--uuid"
      icfg.uuid
      "--kernel"
      kernel
      "--initrd"
      initrd
      "--init"
      init
    ]
    ++ lib.concatMap (p: [
      "--param"
      p
    ]) params
  );

  s3Args = lib.escapeShellArgs (
    lib.optionals (sourceSettings ? s3_endpoint) [
      "--endpoint"
      sourceSettings.s3_endpoint
    ]
    ++ lib.optionals (sourceSettings ? s3_region) [
      "--region"
      sourceSettings.s3_region
    ]
  );

  release =
    pkgs.runCommand "organixm-release-${icfg.name}-${toString icfg.serial}"
      {
        nativeBuildInputs = [ cfg.package ];
      }
      ''
        ${sizeCheck}
        mkdir -p "$out"
        organixctl publish ${rootImage} --to "$out/${icfg.name}" ${releaseArgs} --allow-unsigned
      '';

  publish = pkgs.writeShellApplication {
    name = "organixm-publish";
    runtimeInputs = [ cfg.package ];
    text = ''
      # Usage: organixm-publish --secret-key PATH [--password-file FILE] [organixctl publish options]
      # Uploads this configuration's root image as release ${toString icfg.serial}
      # to ${icfg.publishTo}. S3 credentials come from the AWS environment or
      # --credentials-file; the signing key is read here, never from the store.
      ${sizeCheck}
      exec organixctl publish ${rootImage} --to ${lib.escapeShellArg icfg.publishTo} ${releaseArgs} ${s3Args} "$@"
    '';
  };

  installer = pkgs.nixos (
    { modulesPath, ... }:
    {
      imports = [ (modulesPath + "/installer/cd-dvd/installation-cd-minimal.nix") ];

      # The release lies on the ISO's file system (mounted on /iso), not in
      # the installer's store: its image is already compressed.
      isoImage.contents = [
        {
          source = release;
          target = "/organixm-release";
        }
      ];

      systemd.services.organixm-install = {
        description = "Install the bundled organixm release on the first disk, then power off";
        wantedBy = [ "multi-user.target" ];
        after = [
          "local-fs.target"
          "systemd-udev-settle.service"
        ];
        wants = [ "systemd-udev-settle.service" ];
        path = [ cfg.package ];
        serviceConfig = {
          Type = "oneshot";
          StandardOutput = "journal+console";
          StandardError = "journal+console";
        };
        # On failure the machine stays up with the error on the console.
        script = ''
          organixctl provision --first-disk \
            --release /iso/organixm-release/${icfg.name}.meta \
            --firmware ${icfg.installer.firmware} \
            ${lib.optionalString (icfg.installer.slotSize != null) "--slot-size ${icfg.installer.slotSize}"} \
            --yes
          echo "organixm: installed release ${icfg.version} (serial ${toString icfg.serial}); powering off"
          systemctl poweroff
        '';
      };
    }
  );
in
{
  options.services.organixm.image = {
    name = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9._-]+";
      default = baseNameOf cfg.settings.source.url;
      defaultText = lib.literalExpression "baseNameOf config.services.organixm.settings.source.url";
      description = "Object name of the release: `NAME.meta` in the release directory and at the source.";
    };

    version = lib.mkOption {
      type = lib.types.singleLineStr;
      default = config.system.nixos.label;
      defaultText = lib.literalExpression "config.system.nixos.label";
      description = "Human-readable version shown by `organixctl status`.";
    };

    serial = lib.mkOption {
      type = lib.types.ints.unsigned;
      example = 42;
      description = ''
        Serial of the release built from this configuration. Hosts only move
        to a higher serial (anti-rollback), so raise it for every release,
        for example from CI's build number.
      '';
    };

    uuid = lib.mkOption {
      type = lib.types.strMatching "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
      default = derivedUuid;
      defaultText = lib.literalMD "derived from the hash of `config.system.build.toplevel`";
      description = "UUID of the release (the original tool's `version_uuid`).";
    };

    maxSize = lib.mkOption {
      type = lib.types.nullOr lib.types.ints.positive;
      default = null;
      example = 10240;
      description = ''
        Largest root image accepted, in MiB: the slot size of the hosts (the
        original tool's `version_max_size`). Building a release or publishing
        fails when the image is larger. Also the installer's default slot size.
      '';
    };

    volumeLabel = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9_-]{1,16}";
      default = "organixm";
      description = "ext4 label of the root image (the same in both slots; slots are told apart by partition).";
    };

    publishTo = lib.mkOption {
      type = lib.types.str;
      default = cfg.settings.source.url;
      defaultText = lib.literalExpression "config.services.organixm.settings.source.url";
      description = "Where `organixm-publish` uploads: `s3://BUCKET/PATH/NAME` or `DIR/NAME`.";
    };

    installer = {
      firmware = lib.mkOption {
        type = lib.types.enum [
          "bios"
          "uefi"
          "both"
        ];
        default = "both";
        description = "Firmware the installed disk boots with.";
      };
      slotSize = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = if icfg.maxSize != null then "${toString icfg.maxSize}M" else null;
        defaultText = lib.literalExpression ''"''${toString config.services.organixm.image.maxSize}M" (null when maxSize is null)'';
        example = "8G";
        description = "Size of each root slot the installer creates; null lets `organixctl provision` choose.";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    system.build.organixm = {
      inherit
        bootEnv
        rootImage
        release
        publish
        ;
      installerIso = installer.config.system.build.isoImage;
    };
  };
}
