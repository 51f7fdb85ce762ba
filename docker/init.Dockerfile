# tern-init: installs a pod's iptables redirects (run as an init container with
# NET_ADMIN and NET_RAW), or holds a pod's network namespace (`--entrypoint /usr/local/bin/tern-pause`).
# Carries iptables (nft and legacy) and its extension modules from this machine.
# Built by docker/build-images.sh (the context is the staged root filesystem).
FROM scratch
COPY rootfs/ /
USER 0:0
ENTRYPOINT ["/usr/local/bin/tern-init"]
