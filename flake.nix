{
  description = "organixm: self-updating, read-only, image-based NixOS hosts with A/B root slots";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      # The disk layout and GRUB setup are x86 (BIOS and UEFI) only.
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
    in
    {
      # services.organixm, the read-only root layout and the builders under
      # config.system.build.organixm (see docs/nixos.md).
      nixosModules.default = ./nixos-module;

      overlays.default = final: _prev: {
        organixm = final.callPackage ./nixos-module/package.nix { };
      };

      packages.${system} = {
        organixm = pkgs.callPackage ./nixos-module/package.nix { };
        default = self.packages.${system}.organixm;
      };

      lib = {
        # A NixOS system with organixm. Its builders are
        #   (mkHost { modules = [ ./kiosk.nix ]; }).config.system.build.organixm
        #     .rootImage .release .publish .installerIso .bootEnv
        mkHost =
          { modules }:
          nixpkgs.lib.nixosSystem {
            modules = [
              self.nixosModules.default
              { nixpkgs.hostPlatform = system; }
            ] ++ modules;
          };
      };

      # Needs a machine that can build NixOS systems and run QEMU VMs.
      checks.${system}.update = pkgs.testers.runNixOSTest ./nixos-module/tests/update.nix;
    };
}
