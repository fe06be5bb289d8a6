#!/usr/bin/env bash
# readme-commands.sh SECTION — the commands of the README's ```sh blocks
# under the heading "## SECTION", one a line, each without its trailing
# comment (` # …`); comment and answer lines (`# …`) are left out. One-line
# commands only: a command continued on the next line comes out as two.
#
# scripts/package-test.sh and scripts/systemd-test.sh run the commands of
# "Packages and systemd" as they read them here, so what CI runs is what
# the README shows; tests/readme.rs checks, through their --readme-plan,
# that every line of that block is run by one of them.
set -euo pipefail
section=${1:?usage: readme-commands.sh SECTION}
readme="$(dirname "$0")/../README.md"
awk -v want="## $section" '
    /^```/ {
        if (fenced) { fenced = 0 } else { fenced = 1; sh = ($0 == "```sh") }
        next
    }
    !fenced && /^#+ / { here = ($0 == want); next }
    fenced && sh && here && NF && !/^[ \t]*#/ { sub(/[ \t]+#.*$/, ""); print }
' "$readme"
