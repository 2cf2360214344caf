# NixOS VM test of a whole organixm update cycle, for users with Nix:
#
#   nix build .#checks.x86_64-linux.update
#
# A host is installed with release 1 by `organixctl provision` (run in a
# build VM) and boots through the real GRUB from its own disk. A web server
# then offers release 2: the daemon installs it into the other slot and flips
# GRUB to try it; after a reboot the trial boot reaches its success unit and
# is committed. Release 3 is broken (its success unit fails): its trial boot
# marks the slot bad, the next boot is release 2 again, and release 3 is not
# installed a second time.
#
# The project's own CI has no Nix builds; it only parses this file
# (`nix-instantiate --parse`). See docs/nixos.md.
{ hostPkgs, lib, ... }:

let
  # Every release is the same host; they differ in serial, in a file that
  # names the serial, and release 3 in a success unit that fails.
  host =
    {
      serial,
      broken ? false,
    }:
    { config, pkgs, ... }:
    {
      imports = [ ../default.nix ];

      services.organixm = {
        enable = true;
        settings.source.url = "http://server/current/host";
        settings.daemon.poll_interval = 10;
        successUnits = [ "organixm-test-ready.service" ];
        trialBoots = 1;
        reboot = "never";
        image = {
          inherit serial;
          version = "test-${toString serial}";
        };
      };

      systemd.services.organixm-test-ready = {
        description = "Stands for the host's real work: fails on the broken release";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = if broken then "echo 'release ${toString serial} is broken'; exit 1" else "true";
      };

      environment.etc."organixm-test-serial".text = toString serial;
      # Booted by GRUB, not by QEMU with the test's own -append line.
      boot.kernelParams = [ "console=ttyS0" ];
      environment.systemPackages = [ pkgs.grub2 ];

      # The releases are three nodes of this test, but one machine.
      networking.hostName = lib.mkForce "machine";

      # Boot the provisioned disk through its own GRUB, with its own store
      # and the organixm layout instead of the test VM's.
      virtualisation.directBoot.enable = false;
      virtualisation.mountHostNixStore = false;
      virtualisation.writableStore = false;
      virtualisation.useDefaultFilesystems = false;
      virtualisation.fileSystems = lib.mkForce config.services.organixm.readOnlyRoot.fileSystems;
      virtualisation.memorySize = 1536;
    };
in
{
  name = "organixm-update";

  nodes = {
    machine = host { serial = 1; };
    # Never started: only their releases are used.
    v2 = host { serial = 2; };
    v3 = host {
      serial = 3;
      broken = true;
    };

    server =
      { pkgs, ... }:
      {
        environment.systemPackages = [ pkgs.curl ];
        services.nginx = {
          enable = true;
          virtualHosts.server = {
            default = true;
            root = "/srv/releases";
          };
        };
        networking.firewall.allowedTCPPorts = [ 80 ];
        systemd.tmpfiles.rules = [ "d /srv/releases 0755 root root -" ];
      };
  };

  testScript =
    { nodes, ... }:
    let
      release = name: nodes.${name}.system.build.organixm.release;

      # The disk as the installer leaves it: partitions, GRUB, release 1.
      disk = hostPkgs.vmTools.runInLinuxVM (
        hostPkgs.runCommand "organixm-test-disk"
          {
            preVM = hostPkgs.vmTools.createEmptyImage {
              size = 6144;
              fullName = "organixm-test-disk";
            };
            nativeBuildInputs = [ nodes.machine.services.organixm.package ];
            memSize = 1024;
          }
          ''
            organixctl provision --disk /dev/vda --release ${release "machine"}/host.meta \
              --firmware bios --slot-size 2G --yes
          ''
      );
    in
    ''
      import os
      import subprocess
      import tempfile


      def booted_slot():
          return machine.succeed("grep -o 'organixm\\.slot=[ab]' /proc/cmdline | cut -d= -f2").strip()


      def serial():
          return machine.succeed("cat /etc/organixm-test-serial").strip()


      def wait_state(slot, state):
          machine.wait_until_succeeds(
              f"grub-editenv /boot/grub/grubenv list | grep -x 'organixm_{slot}_state={state}'",
              timeout=900,
          )


      def offer(name, path):
          server.succeed(f"ln -sfn {path} /srv/releases/current")
          server.succeed("curl --fail -s http://localhost/current/host.meta > /dev/null")
          print(f"offering {name}")


      def update(expected):
          # Exit code by the verdict: 0 up to date, 1 staged, 2 blocked or failed.
          status, output = machine.execute("organixctl update --wait")
          assert status == expected, f"organixctl update exited {status}, not {expected}: {output}"


      def reboot():
          machine.shutdown()
          machine.start()
          machine.wait_for_unit("multi-user.target")


      # The server starts first: NIX_DISK_IMAGE, set below for the host, would
      # also name the disk of any VM started after it.
      server.start()
      server.wait_for_unit("nginx.service")
      offer("release 1", "${release "machine"}")

      host_disk = tempfile.NamedTemporaryFile(suffix=".qcow2")
      subprocess.run(
          [
              "${hostPkgs.qemu_kvm}/bin/qemu-img", "create", "-f", "qcow2",
              "-F", "qcow2", "-b", "${disk}/disk-image.qcow2", host_disk.name,
          ],
          check=True,
      )
      # The host's VM script boots the disk named here (a copy-on-write layer
      # over the provisioned disk), at every start.
      os.environ["NIX_DISK_IMAGE"] = host_disk.name

      machine.start()
      machine.wait_for_unit("organixm-mark-good.service")
      first = booted_slot()
      other = "b" if first == "a" else "a"
      assert serial() == "1", "the installed disk boots release 1"

      with subtest("the root is read-only, /etc and /var are writable"):
          machine.succeed("findmnt -n -o OPTIONS / | tr , '\\n' | grep -x ro")
          machine.succeed(f"test \"$(blockdev --getro /dev/disk/by-partlabel/organixm-{first})\" = 1")
          machine.fail("mount -o remount,rw /")
          machine.fail("touch /nix/store/organixm-test")
          machine.succeed("touch /etc/organixm-test /var/organixm-test /home/organixm-test /root/organixm-test")
          machine_id = machine.succeed("cat /etc/machine-id").strip()

      with subtest("release 2 is installed into the other slot and tried"):
          offer("release 2", "${release "v2"}")
          update(1)
          wait_state(other, "trial")
          assert booted_slot() == first, "the running slot is untouched until the reboot"
          reboot()
          assert booted_slot() == other, "GRUB boots the new slot"
          assert serial() == "2"
          machine.succeed("grep -w 'organixm.reason=trial' /proc/cmdline")

      with subtest("the trial boot reaches its success unit and is committed"):
          machine.wait_for_unit("organixm-test-ready.service")
          machine.wait_for_unit("organixm-mark-good.service")
          wait_state(other, "good")
          assert machine.succeed("cat /etc/machine-id").strip() == machine_id, "the machine id survives updates"
          machine.succeed("test -e /var/organixm-test")
          machine.fail("test -e /etc/organixm-test")

      with subtest("a broken release 3 is tried once, marked bad, and the host falls back"):
          offer("release 3", "${release "v3"}")
          update(1)
          wait_state(first, "trial")
          reboot()
          assert booted_slot() == first and serial() == "3", "release 3 is on trial"
          wait_state(first, "bad")
          reboot()
          assert booted_slot() == other and serial() == "2", "the host is back on release 2"

      with subtest("the failed release is not installed again"):
          update(2)
          machine.succeed("organixctl history | grep -i 'organixm.test-ready.service'")
          machine.fail(f"grub-editenv /boot/grub/grubenv list | grep -x 'organixm_{first}_state=trial'")
          assert booted_slot() == other
    '';
}
