SUMMARY = "Edge IoT gateway forwarding end-to-end encrypted MQTT messages, durably"
DESCRIPTION = "blindgate accepts MQTT over TLS from devices that seal every \
               message end to end, stores each envelope durably before \
               acknowledging it, and forwards it unchanged to the cloud broker \
               over mutual TLS 1.3. The gateway holds no device key. The \
               blindgate-cloud package adds the cloud ingest service (same binary)."
HOMEPAGE = "https://example.invalid/blindgate"
SECTION = "net"

# blindgate's own code is Apache-2.0 (LICENSE); the crates it links keep their own
# licenses (MIT, Apache-2.0, ISC, BSD-3-Clause), listed by `cargo metadata`.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# The repository is not public yet: the URL and SRCREV are placeholders. Override them
# in local.conf (or a bbappend), e.g.
#   BLINDGATE_GIT_URI = "git://git.example.com/blindgate.git;protocol=ssh;branch=main"
#   SRCREV:pn-blindgate = "<40-hex commit whose Cargo.lock matches blindgate-crates.inc>"
# or build a local checkout with externalsrc (see yocto/README.md).
BLINDGATE_GIT_URI ??= "git://git.example.invalid/blindgate.git;protocol=https;branch=main"
SRC_URI = "${BLINDGATE_GIT_URI}"
SRCREV = "0000000000000000000000000000000000000000"

inherit cargo cargo-update-recipe-crates features_check systemd useradd

# Every crates.io package of Cargo.lock (written by yocto/gen-crates-inc, or by
# `bitbake -c update_crates blindgate`; both produce the same file).
require ${BPN}-crates.inc

# Type=notify units and a sysusers.d file: this is a systemd service.
REQUIRED_DISTRO_FEATURES = "systemd"

# The workspace has two members (the root package and e3, a library). Build only the
# root package's binary.
CARGO_BUILD_FLAGS:append = " --package blindgate --bin blindgate"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/blindgate ${D}${bindir}/blindgate

    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/blindgate.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/blindgate-cloud.service ${D}${systemd_system_unitdir}/

    install -d ${D}${nonarch_libdir}/sysusers.d
    install -m 0644 ${S}/systemd/blindgate.sysusers ${D}${nonarch_libdir}/sysusers.d/blindgate.conf

    # Config (no secrets) readable by group blindgate; the operator puts certificates
    # and keys in /etc/blindgate/certs (keys 0640 root:blindgate). The group exists
    # here thanks to the useradd class.
    install -d -m 0750 -o root -g blindgate ${D}${sysconfdir}/blindgate
    install -d -m 0750 -o root -g blindgate ${D}${sysconfdir}/blindgate/certs
    install -m 0640 -o root -g blindgate ${S}/config/gateway.toml ${D}${sysconfdir}/blindgate/
    install -m 0640 -o root -g blindgate ${S}/config/cloud.toml ${D}${sysconfdir}/blindgate/

    # cloud.toml names registry.toml (tenants, devices, gateways): site data the
    # operator writes. Shipped as an example only, as the .deb does.
    install -d ${D}${docdir}/blindgate/examples
    install -m 0644 ${S}/config/registry.toml ${D}${docdir}/blindgate/examples/
}

# blindgate: the gateway (enabled at boot). blindgate-cloud: the cloud ingest service
# and its config (not enabled: it belongs on a cloud host, not on the gateway).
PACKAGES =+ "${PN}-cloud"

FILES:${PN} += "${nonarch_libdir}/sysusers.d/blindgate.conf \
                ${sysconfdir}/blindgate/gateway.toml \
                ${sysconfdir}/blindgate/certs"
FILES:${PN}-cloud += "${sysconfdir}/blindgate/cloud.toml \
                      ${docdir}/blindgate/examples/registry.toml"
CONFFILES:${PN} = "${sysconfdir}/blindgate/gateway.toml"
CONFFILES:${PN}-cloud = "${sysconfdir}/blindgate/cloud.toml"
RDEPENDS:${PN}-cloud = "${PN}"

SYSTEMD_PACKAGES = "${PN} ${PN}-cloud"
SYSTEMD_SERVICE:${PN} = "blindgate.service"
SYSTEMD_SERVICE:${PN}-cloud = "blindgate-cloud.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"
SYSTEMD_AUTO_ENABLE:${PN}-cloud = "disable"

# The same system user and group as systemd/blindgate.sysusers (the image's
# systemd_sysusers_check compares name, home and shell). Both packages own
# files of group blindgate, so both create it; the second run finds it and skips.
USERADD_PACKAGES = "${PN} ${PN}-cloud"
GROUPADD_PARAM:${PN} = "--system blindgate"
USERADD_PARAM:${PN} = "--system --gid blindgate --comment 'blindgate gateway' \
                       --home-dir ${localstatedir}/lib/blindgate --no-create-home \
                       --shell ${base_sbindir}/nologin blindgate"
GROUPADD_PARAM:${PN}-cloud = "${GROUPADD_PARAM:${PN}}"
USERADD_PARAM:${PN}-cloud = "${USERADD_PARAM:${PN}}"
