# The read-only root layout of an organixm host.
#
#   /                 the booted slot, ext4, read-only (also in the kernel:
#                     blockdev --setro), chosen by GRUB: organixm.slot=a|b
#   /etc              overlay: the image's /etc below, a tmpfs above
#   /var              the rw partition (organixm-rw), formatted on first boot
#   /home, /root      symlinks to /var/home and /var/roothome (as on OSTree
#                     systems), so they live on the rw partition too
#   /boot             the boot partition (grub.cfg, grubenv), for the daemon
#   /tmp, /nix/var    tmpfs
#
# Everything else the running system writes goes to one of those. The layout
# is made in stage 1 of the scripted initrd, because NixOS activation (stage 2,
# before systemd) already writes to /etc and /var.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.organixm;
  rcfg = cfg.readOnlyRoot;

  # tmpfs holding the upper and work directories of the /etc overlay. It is a
  # mount point inside the image because stage 1 can create nothing on the
  # read-only root.
  volatile = "/organixm/volatile";

  # The machine id must survive reboots (the daemon's staged-rollout bucket,
  # journal, DHCP client id); /etc is on tmpfs, so it is kept on /var and
  # copied into /etc before systemd starts.
  machineIdFile = "/var/lib/organixm/machine-id";

  layout = {
    "/" = {
      # /dev/root is made by postDeviceCommands below from organixm.slot=.
      device = "/dev/root";
      fsType = "ext4";
      options = [ "ro" ];
      # The slot's content was verified against the release's SHA-256 before
      # GRUB was pointed at it; fsck could only modify it.
      noCheck = true;
    };
    ${volatile} = {
      device = "tmpfs";
      fsType = "tmpfs";
      options = [ "mode=0755" ];
      neededForBoot = true;
    };
    "/etc" = {
      device = "overlay";
      fsType = "overlay";
      # Stage 1 prefixes these with the new root and creates upper and work.
      options = [
        "lowerdir=/etc"
        "upperdir=${volatile}/etc/upper"
        "workdir=${volatile}/etc/work"
      ];
      depends = [ volatile ];
      neededForBoot = true;
    };
    "/var" =
      if rcfg.rwDevice != null then
        {
          device = rcfg.rwDevice;
          fsType = "ext4";
          options = [ "noatime" ];
          neededForBoot = true;
        }
      else
        {
          device = "tmpfs";
          fsType = "tmpfs";
          options = [ "mode=0755" ];
          neededForBoot = true;
        };
    "/nix/var" = {
      device = "tmpfs";
      fsType = "tmpfs";
      options = [ "mode=0755" ];
      neededForBoot = true;
    };
    "/boot" = {
      device = rcfg.bootDevice;
      fsType = "ext4";
      options = [
        "nodev"
        "nosuid"
        "noexec"
      ];
    };
  };

  # Run inside make-ext4-fs's ./files directory, which becomes the image's
  # root next to /nix/store. Mount points must exist in the image: nothing
  # can create them once the root is mounted read-only.
  populateCommands = ''
    mkdir -p files/etc files/var files/boot files/tmp files/proc files/sys files/dev \
      files/run files/bin files/usr/bin files/nix/var files${volatile}
    ln -s var/home files/home
    ln -s var/roothome files/root
    # Activation cannot write these on a read-only root (see below).
    ln -s ${config.environment.binsh} files/bin/sh
    ${lib.optionalString (
      config.environment.usrbinenv != null
    ) "ln -s ${config.environment.usrbinenv} files/usr/bin/env"}
  ''
  + lib.concatMapStrings (file: ''
    mkdir -p ${lib.escapeShellArg "files${dirOf file.target}"}
    cp -RT --no-preserve=ownership ${lib.escapeShellArg "${file.source}"} ${lib.escapeShellArg "files${file.target}"}
    chmod ${file.mode} ${lib.escapeShellArg "files${file.target}"}
  '') cfg.image.extraRootFiles;

  extraRootFile = lib.types.submodule {
    options = {
      source = lib.mkOption {
        type = lib.types.path;
        description = "File or directory (a derivation or a path) to copy into the image.";
      };
      target = lib.mkOption {
        type = lib.types.strMatching "/.+";
        example = "/etc/kiosk/config.json";
        description = ''
          Absolute path on the root file system. Outside /etc and /var this
          is read-only at run time; under /var it is hidden by the rw
          partition, so use it for /etc or other read-only locations.
        '';
      };
      mode = lib.mkOption {
        type = lib.types.strMatching "0?[0-7]{3,4}";
        default = "0644";
        description = "Permissions of the target (of the directory itself, when a directory is copied).";
      };
      user = lib.mkOption {
        type = lib.types.str;
        default = "root";
        description = ''
          Owner of the target and everything below it. The user needs a
          fixed `uid` (users.users.NAME.uid): the image is built before the
          host ever runs, so no id can be allocated.
        '';
      };
      group = lib.mkOption {
        type = lib.types.str;
        default = "root";
        description = "Group of the target and everything below it; needs a fixed `gid`.";
      };
    };
  };
in
{
  options.services.organixm = {
    readOnlyRoot = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = cfg.enable;
        defaultText = lib.literalExpression "config.services.organixm.enable";
        description = ''
          Whether to lay the host out as an organixm image: root read-only
          from the slot GRUB booted, /etc on an overlay, /var, /home and /root
          on the rw partition. Turn off only to run the daemon on a host laid
          out some other way (for example in a test).
        '';
      };

      rwDevice = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = "/dev/disk/by-partlabel/organixm-rw";
        description = ''
          Partition for /var (and through it /home and /root). Formatted as
          ext4 on the first boot when it holds no file system. `null` puts
          /var on a tmpfs: nothing survives a reboot, not even the machine id.
        '';
      };

      bootDevice = lib.mkOption {
        type = lib.types.str;
        default = "/dev/disk/by-partlabel/organixm-boot";
        description = "Boot partition holding grub.cfg and the GRUB environment block, mounted on /boot.";
      };

      fileSystems = lib.mkOption {
        type = lib.types.attrsOf lib.types.anything;
        default = layout;
        readOnly = true;
        internal = true;
        description = ''
          The layout above, for virtual machine tests that must hand it to
          `virtualisation.fileSystems` (which overrides `fileSystems`).
        '';
      };

      populateCommands = lib.mkOption {
        type = lib.types.lines;
        default = populateCommands;
        readOnly = true;
        internal = true;
        description = "Commands filling make-ext4-fs's ./files directory (used by image.nix).";
      };
    };

    image.extraRootFiles = lib.mkOption {
      type = lib.types.listOf extraRootFile;
      default = [ ];
      example = lib.literalExpression ''
        [ {
          source = ./kiosk/config.json;
          target = "/etc/kiosk/config.json";
          mode = "0640";
          user = "kiosk";
          group = "kiosk";
        } ]
      '';
      description = ''
        Files copied onto the root image when it is built, with their mode
        and owner (the original tool's `extraRootFiles`).
      '';
    };
  };

  config = lib.mkIf rcfg.enable {
    assertions = [
      {
        # postDeviceCommands and postMountCommands are the scripted initrd's.
        assertion = !config.boot.initrd.systemd.enable;
        message = "services.organixm.readOnlyRoot needs the scripted initrd: set boot.initrd.systemd.enable = false.";
      }
    ]
    ++ lib.concatMap (file: [
      {
        assertion = config.users.users ? ${file.user} && config.users.users.${file.user}.uid != null;
        message = "services.organixm.image.extraRootFiles: ${file.target} belongs to user ${file.user}, which needs a fixed users.users.${file.user}.uid.";
      }
      {
        assertion = config.users.groups ? ${file.group} && config.users.groups.${file.group}.gid != null;
        message = "services.organixm.image.extraRootFiles: ${file.target} belongs to group ${file.group}, which needs a fixed users.groups.${file.group}.gid.";
      }
    ]) cfg.image.extraRootFiles;

    fileSystems = layout;

    # ext4 and tmpfs come with the file systems needed for boot; the overlay
    # module must be in the initrd and loaded before /etc is mounted.
    boot.initrd.kernelModules = [ "overlay" ];

    boot.initrd.extraUtilsCommands = lib.mkIf (rcfg.rwDevice != null) ''
      copy_bin_and_libs ${pkgs.e2fsprogs}/sbin/mke2fs
    '';
    boot.initrd.extraUtilsCommandsTest = lib.mkIf (rcfg.rwDevice != null) ''
      $out/bin/mke2fs -V
    '';

    boot.initrd.postDeviceCommands = ''
      # organixm: GRUB passes the slot it chose (organixm.slot=a|b); the root
      # file system is that slot's partition. The two slot images are
      # identical, so no label inside them could tell them apart.
      # The first organixm.slot= wins (GRUB puts its own first), as in the
      # daemon; an invalid first value means no slot.
      organixm_root=
      organixm_slot_seen=
      for o in $(cat /proc/cmdline); do
        case $o in
          organixm.slot=*)
            if [ -z "$organixm_slot_seen" ]; then
              organixm_slot_seen=1
              case $o in
                organixm.slot=a) organixm_root=${cfg.settings.slots.a} ;;
                organixm.slot=b) organixm_root=${cfg.settings.slots.b} ;;
              esac
            fi
            ;;
        esac
      done
      if [ -n "$organixm_root" ]; then
        ln -sfn "$organixm_root" /dev/root
      elif [ ! -L /dev/root ]; then
        echo "organixm: the kernel command line has neither organixm.slot=a|b nor root=;"
        echo "organixm: cannot tell which slot to mount. Boot through the organixm GRUB menu."
        fail
      fi
    ''
    + lib.optionalString (rcfg.rwDevice != null) ''
      # organixm: format the rw partition on the first boot. Only a partition
      # that reads fine and holds no known signature at all (blkid -p exits
      # 2) is formatted; anything else is left alone.
      organixm_rw=${rcfg.rwDevice}
      if waitDevice "$organixm_rw"; then
        blkid -p "$organixm_rw" > /dev/null 2>&1
        organixm_probe=$?
        if [ "$organixm_probe" -eq 2 ] && dd if="$organixm_rw" of=/dev/null bs=1M count=1 2> /dev/null; then
          echo "organixm: formatting the empty rw partition $organixm_rw"
          mke2fs -t ext4 -q -L organixm-rw "$organixm_rw" || fail
        fi
      fi
    '';

    boot.initrd.postMountCommands = ''
      # organixm: make the booted slot read-only in the kernel. Stage 2's
      # "remount,rw /" then fails harmlessly, and no process can write the
      # slot the machine is running from.
      blockdev --setro /dev/root

      # Stage 1 creates the overlay's upper directory with mode 0700, and the
      # root of an overlay takes its mode from there: /etc must be 0755.
      chmod 0755 "$targetRoot/etc"

      # /home and /root point into /var.
      mkdir -p "$targetRoot/var/home" "$targetRoot/var/lib/organixm" "$targetRoot/nix/var/nix/gcroots"
      mkdir -p -m 0700 "$targetRoot/var/roothome"

      # A stable machine id, kept on /var, in place before systemd reads it.
      if [ ! -s "$targetRoot${machineIdFile}" ]; then
        tr -d '-' < /proc/sys/kernel/random/uuid > "$targetRoot${machineIdFile}.new"
        mv "$targetRoot${machineIdFile}.new" "$targetRoot${machineIdFile}"
      fi
      cp "$targetRoot${machineIdFile}" "$targetRoot/etc/machine-id"
    '';

    # These activation snippets replace /bin/sh and /usr/bin/env on every
    # boot, which a read-only root refuses; the image carries both links
    # (populateCommands) pointing at the same store paths instead.
    system.activationScripts.binsh = lib.mkForce "";
    system.activationScripts.usrbinenv = lib.mkForce "";
    # Same for the /lib64 loader stub.
    environment.stub-ld.enable = lib.mkDefault false;

    boot.tmp.useTmpfs = lib.mkDefault true;

    # The store is part of the image and cannot change: there is nothing for
    # a Nix daemon to do, and no nixos-rebuild (a new release is a new image).
    nix.enable = lib.mkDefault false;

    # Host keys on /etc would change at every boot.
    services.openssh.hostKeys = lib.mkDefault [
      {
        path = "/var/lib/ssh/ssh_host_ed25519_key";
        type = "ed25519";
      }
    ];
  };
}
