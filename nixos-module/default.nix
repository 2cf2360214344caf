# NixOS module of organixm: the update daemon (organixm-update.service), its
# configuration file, and the boot-assessment units that commit or reject a
# trial boot. The read-only root layout is in ./readonly-root.nix, the image,
# release and installer builders in ./image.nix; both are imported here so
# that one import gives the whole product.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.organixm;

  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "organixmd.toml" cfg.settings;

  # systemd copies the credentials file here when the service starts
  # (LoadCredential=); the file itself never enters the Nix store.
  credentialName = "s3";
  credentialPath = "/run/credentials/organixm-update.service/${credentialName}";

  # Exists (on tmpfs) once this boot has been committed.
  committedFlag = "/run/organixm-boot-committed";

  # The daemon rewrites the GRUB environment block in this directory.
  grubDir = dirOf cfg.settings.boot.grubenv;

  unitName = utils.systemdUtils.lib.unitNameType;

  # One TOML table of the configuration file: typed keys for what the
  # module itself relies on or what most hosts set, anything else the
  # daemon accepts passes through (RFC 42). The daemon rejects unknown keys
  # at start-up with a message naming the key.
  section =
    description: options:
    lib.mkOption {
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        inherit options;
      };
      default = { };
      inherit description;
    };
in
{
  imports = [
    ./readonly-root.nix
    ./image.nix
  ];

  options.services.organixm = {
    enable = lib.mkEnableOption "organixm, A/B image updates of a read-only NixOS host";

    # organixm is not in nixpkgs, so lib.mkPackageOption (which names an
    # attribute of pkgs) has nothing to point at. The default is this
    # repository's own derivation; an overlay or a pinned build can still be
    # passed here.
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nixos-module/package.nix { }";
      description = "The organixm package providing `organixmd` and `organixctl`.";
    };

    publicKeys = lib.mkOption {
      type = lib.types.listOf lib.types.singleLineStr;
      default = [ ];
      example = [ "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3" ];
      description = ''
        Trusted minisign public keys (the base64 line of a `.pub` file).
        When the list is not empty, a release descriptor without a valid
        signature by one of these keys is refused before any byte is written.
      '';
    };

    credentialsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/secrets/organixm-s3";
      description = ''
        Path, on the host, of a file with `AWS_ACCESS_KEY_ID=...` and
        `AWS_SECRET_ACCESS_KEY=...` lines giving read access to the bucket.
        It is handed to the service with `LoadCredential=` and never copied
        into the Nix store: give a path as a string, not a Nix path value.
        When set, the daemon is configured to read its S3 credentials from it.
      '';
    };

    successUnits = lib.mkOption {
      type = lib.types.listOf unitName;
      default = [ ];
      example = [ "kiosk.service" ];
      description = ''
        Units that must start successfully for a boot to count as good.
        They are required by `boot-complete.target`; once it is reached,
        `organixm-mark-good.service` commits the booted slot. If one of
        them fails during a trial boot, before the commit,
        `organixm-mark-bad.service` marks the slot bad so that the next boot
        falls back to the previous release; on other boots a failure is left
        to the unit's own restart policy. With an empty
        list, reaching `boot-complete.target` (after `sysinit.target`) is
        enough.
      '';
    };

    trialBoots = lib.mkOption {
      type = lib.types.ints.between 1 9;
      default = 3;
      description = ''
        How many times GRUB tries a newly installed release before falling
        back to the previous one.
      '';
    };

    reboot = lib.mkOption {
      type = lib.types.enum [
        "never"
        "immediately"
        "window"
      ];
      default = "never";
      description = ''
        What the daemon does once a new release is staged: leave the reboot
        to the administrator (`never`), reboot at once (`immediately`), or
        reboot inside {option}`services.organixm.maintenanceWindow`
        (`window`). It also applies to the reboot after a failed trial boot.
      '';
    };

    maintenanceWindow = lib.mkOption {
      type = lib.types.strMatching "([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]";
      default = "02:00-04:00";
      description = ''
        Local-time window `HH:MM-HH:MM` in which reboots happen when
        {option}`services.organixm.reboot` is `window`. A window may wrap
        past midnight (`23:00-01:00`).
      '';
    };

    # The original tool's parameters (version_bucket, version_object_path,
    # version_region, and an endpoint for other S3 services) map onto
    # `settings.source`; kept as options so that a configuration ported from
    # it reads the same.
    s3 = {
      bucket = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "myorganixms";
        description = ''
          S3 bucket the releases are published to. Sets
          `settings.source.url` to `s3://BUCKET/OBJECTPATH`.
        '';
      };
      objectPath = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "kiosk/pos";
        description = ''
          Object path of the release inside the bucket, without `.meta`:
          hosts read `OBJECTPATH.meta` and its signature `OBJECTPATH.meta.minisig`.
        '';
      };
      endpoint = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "https://s3.eu-central-003.backblazeb2.com";
        description = "Endpoint URL of an S3-compatible service other than AWS.";
      };
      region = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "us-east-1";
        description = "S3 region of the bucket.";
      };
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        Contents of `/etc/organixm/organixmd.toml`, the daemon's
        configuration (see `docs/configuration.md` for every key). Secrets do not
        belong here: this file is in the world-readable Nix store. Use
        {option}`services.organixm.credentialsFile` for S3 keys.
      '';
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options = {
          source = section "Where releases are read from (`[source]`)." {
            url = lib.mkOption {
              type = lib.types.strMatching "(s3|https?)://.+|file:///.+";
              example = "s3://myorganixms/kiosk/pos";
              description = ''
                Location of the release without the `.meta` suffix:
                `s3://BUCKET/PATH`, `https://...`, `http://...` or
                `file:///...` (for offline or USB updates). Set directly or
                through {option}`services.organixm.s3.bucket`.
              '';
            };
            credentials = lib.mkOption {
              type = lib.types.enum [
                "env"
                "anonymous"
                "file"
              ];
              default = "env";
              description = ''
                How the daemon finds S3 credentials: the AWS environment and
                profile chain (`env`), none (`anonymous`, for public buckets),
                or `credentials_file` (`file`, set automatically by
                {option}`services.organixm.credentialsFile`).
              '';
            };
            public_keys = lib.mkOption {
              type = lib.types.listOf lib.types.singleLineStr;
              default = cfg.publicKeys;
              defaultText = lib.literalExpression "config.services.organixm.publicKeys";
              description = "Trusted minisign public keys.";
            };
          };

          slots = section "The two root slots (`[slots]`)." {
            a = lib.mkOption {
              type = lib.types.str;
              default = "/dev/disk/by-partlabel/organixm-a";
              description = "Block device of slot A.";
            };
            b = lib.mkOption {
              type = lib.types.str;
              default = "/dev/disk/by-partlabel/organixm-b";
              description = "Block device of slot B.";
            };
          };

          boot = section "GRUB boot control (`[boot]`)." {
            grubenv = lib.mkOption {
              type = lib.types.str;
              default = "/boot/grub/grubenv";
              description = "GRUB environment block on the boot partition.";
            };
            trial_boots = lib.mkOption {
              type = lib.types.ints.between 1 9;
              default = cfg.trialBoots;
              defaultText = lib.literalExpression "config.services.organixm.trialBoots";
              description = "Tries GRUB gives a new release.";
            };
            reboot = lib.mkOption {
              type = lib.types.enum [
                "never"
                "immediately"
                "window"
              ];
              default = cfg.reboot;
              defaultText = lib.literalExpression "config.services.organixm.reboot";
              description = "Reboot policy after staging a release.";
            };
            maintenance_window = lib.mkOption {
              type = lib.types.str;
              default = cfg.maintenanceWindow;
              defaultText = lib.literalExpression "config.services.organixm.maintenanceWindow";
              description = "Reboot window used with `reboot = \"window\"`.";
            };
          };

          daemon = section "The daemon itself (`[daemon]`)." {
            poll_interval = lib.mkOption {
              type = lib.types.ints.positive;
              default = 3600;
              description = "Seconds between checks for a new release.";
            };
            state_dir = lib.mkOption {
              type = lib.types.str;
              default = "/var/lib/organixm";
              readOnly = true;
              description = "State directory; fixed because the unit's `StateDirectory=` creates it.";
            };
            socket = lib.mkOption {
              type = lib.types.str;
              default = "/run/organixm/control.sock";
              readOnly = true;
              description = "Control socket; fixed because the unit's `RuntimeDirectory=` creates its directory.";
            };
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.credentialsFile == null || !lib.hasPrefix builtins.storeDir cfg.credentialsFile;
        message = ''
          services.organixm.credentialsFile points into ${builtins.storeDir}, which every
          user can read. Keep the S3 credentials outside the store, for example in
          /var/lib/secrets, and give that path as a string.
        '';
      }
      {
        assertion = cfg.credentialsFile == null || lib.hasPrefix "/" cfg.credentialsFile;
        message = "services.organixm.credentialsFile must be an absolute path on the host, not ${cfg.credentialsFile}.";
      }
      {
        assertion = cfg.s3.bucket == null || cfg.s3.objectPath != null;
        message = "services.organixm.s3.bucket is set: also set services.organixm.s3.objectPath (for example \"kiosk/pos\").";
      }
      {
        assertion = cfg.settings.source.credentials == "file" -> cfg.settings.source ? credentials_file;
        message = ''
          services.organixm.settings.source.credentials is "file" but no credentials_file is
          configured: set services.organixm.credentialsFile.
        '';
      }
      {
        # NixOS must not install a boot loader: the installer writes one static
        # grub.cfg and the daemon only changes the GRUB environment block.
        assertion = !config.boot.loader.grub.enable && !config.boot.loader.systemd-boot.enable;
        message = ''
          services.organixm owns the boot loader of this host (organixctl provision installs
          GRUB once; updates only change grubenv). Remove boot.loader.grub.enable and
          boot.loader.systemd-boot.enable from the configuration.
        '';
      }
    ];

    boot.loader.grub.enable = lib.mkDefault false;

    services.organixm.settings.source = lib.mkMerge [
      (lib.mkIf (cfg.s3.bucket != null) {
        url = lib.mkDefault "s3://${cfg.s3.bucket}/${cfg.s3.objectPath}";
      })
      (lib.mkIf (cfg.s3.endpoint != null) { s3_endpoint = lib.mkDefault cfg.s3.endpoint; })
      (lib.mkIf (cfg.s3.region != null) { s3_region = lib.mkDefault cfg.s3.region; })
      (lib.mkIf (cfg.credentialsFile != null) {
        credentials = "file";
        credentials_file = credentialPath;
      })
    ];

    environment.etc."organixm/organixmd.toml".source = configFile;

    # organixctl on PATH for administrators (status, history, rollback, ...).
    environment.systemPackages = [ cfg.package ];

    systemd.services.organixm-update = {
      description = "organixm image updates";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartTriggers = [ configFile ];
      # No RequiresMountsFor on the boot partition: without it the daemon still starts,
      # sends READY (units ordered after it are not held up) and status says the boot
      # partition is missing; "-" in ReadWritePaths below is for the same reason.
      unitConfig.RequiresMountsFor = [ "/var/lib/organixm" ];

      serviceConfig = {
        # READY=1 comes after the boot-time check (nothing new, release
        # staged, or failure logged): services ordered after this one start
        # once that check is over, as with the original tool.
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/organixmd --config /etc/organixm/organixmd.toml";
        # The boot-time check may download and verify a whole image before
        # READY=1; the watchdog only starts once the service is up.
        TimeoutStartSec = lib.mkDefault "1h";
        WatchdogSec = "2min";
        Restart = "on-failure";
        RestartSec = "10s";

        RuntimeDirectory = "organixm";
        RuntimeDirectoryMode = "0755";
        StateDirectory = "organixm";
        StateDirectoryMode = "0700";
        LoadCredential = lib.optional (cfg.credentialsFile != null) "${credentialName}:${cfg.credentialsFile}";
        UMask = "0027";

        # Runs as root: it writes whole block devices and the GRUB
        # environment. Everything else is narrowed below.
        ProtectSystem = "strict";
        # "-": a missing boot partition must not stop the daemon from
        # starting; it then reports that it cannot flip slots.
        ReadWritePaths = [ "-${grubDir}" ];
        ProtectHome = true;
        PrivateTmp = true;

        # Block devices stay visible (no PrivateDevices=); only the two slot
        # partitions may be opened. The booted slot is also set read-only in
        # the kernel at boot (readonly-root.nix), so the rule "never write the
        # booted slot" does not rest on this unit alone.
        DevicePolicy = "closed";
        DeviceAllow = [
          "${cfg.settings.slots.a} rw"
          "${cfg.settings.slots.b} rw"
        ];

        # CAP_CHOWN: hand the control socket to its group. CAP_SYS_ADMIN:
        # block-device ioctls (flushing a slot's buffers before reading it
        # back). Nothing else.
        CapabilityBoundingSet = [
          "CAP_CHOWN"
          "CAP_SYS_ADMIN"
        ];
        NoNewPrivileges = true;

        # Downloads releases: no PrivateNetwork=.
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectControlGroups = true;
        # /proc/cmdline (the booted slot) and /proc/self/mountinfo must stay
        # readable, so no ProcSubset=pid.
        ProtectProc = "invisible";
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" ];
        SystemCallErrorNumber = "EPERM";
        # MemoryDenyWriteExecute= is left off: cffi callbacks in Python
        # libraries map writable and executable memory.
      };
    };

    # Automatic boot assessment, as systemd's boot-complete.target defines
    # it: the success units are required by the target and ordered before
    # it; a oneshot ordered after it commits the slot.
    systemd.targets.boot-complete = {
      description = "Boot Completion Check";
      requires = [ "sysinit.target" ] ++ cfg.successUnits;
      after = [ "sysinit.target" ] ++ cfg.successUnits;
    };

    # OnFailure= on each success unit, as a drop-in so that it applies
    # whatever defines the unit (a NixOS option, a package, systemd itself).
    systemd.packages = map (
      unit:
      pkgs.writeTextDir "lib/systemd/system/${unit}.d/organixm-boot-assessment.conf" ''
        [Unit]
        OnFailure=organixm-mark-bad.service
      ''
    ) cfg.successUnits;

    systemd.services.organixm-mark-good = {
      description = "Commit the booted organixm slot after a successful boot";
      wantedBy = [ "multi-user.target" ];
      requires = [ "boot-complete.target" ];
      wants = [ "organixm-update.service" ];
      after = [
        "boot-complete.target"
        "organixm-update.service"
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${cfg.package}/bin/organixctl mark-good";
        # This boot is committed: organixm-mark-bad no longer acts on it.
        ExecStartPost = "${pkgs.coreutils}/bin/touch ${committedFlag}";
        # A commit cut short (the daemon killed or restarting) is tried again, a few
        # times, instead of leaving the trial to the commit deadline.
        Restart = "on-failure";
        RestartSec = "5s";
        RestartPreventExitStatus = "4 64";
      };
      startLimitIntervalSec = 600;
      startLimitBurst = 10;
    };

    systemd.services.organixm-mark-bad = {
      description = "Mark the booted organixm slot bad after a failed boot";
      wants = [ "organixm-update.service" ];
      after = [ "organixm-update.service" ];
      # Only a trial boot is judged (GRUB passes organixm.reason=trial), and
      # only until it is committed: a success unit that fails later, or on a
      # boot of an already committed slot, must not throw away a good release.
      # (`organixctl mark-bad` itself marks whatever slot is running.)
      unitConfig = {
        ConditionKernelCommandLine = "organixm.reason=trial";
        ConditionPathExists = "!${committedFlag}";
      };
      path = [ cfg.package ];
      serviceConfig.Type = "oneshot";
      # systemd names the failed unit in MONITOR_UNIT; the reason is kept with
      # the failed release and shown by `organixctl status` and `history`.
      script = ''
        organixctl mark-bad --reason "boot success unit ''${MONITOR_UNIT:-unknown} failed during the trial boot"
      '';
    };
  };
}
