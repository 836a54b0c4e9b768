#!/bin/sh
# Print the path of the Python interpreter of VERSION (3.12, or exactly 3.12.1): pyenv's if it
# has one, else pythonX.Y on PATH. Without either it stops, naming what to install.
set -eu
version="${1:?usage: find_python.sh VERSION (e.g. 3.13)}"
minor=$(echo "$version" | cut -d. -f1,2)

if pyenv=$(command -v pyenv 2>/dev/null); then
    # pyenv looks under $HOME/.pyenv unless told otherwise; a fresh HOME (CI) must not hide the
    # versions installed beside the pyenv found on PATH (<root>/bin/pyenv).
    if [ -z "${PYENV_ROOT:-}" ] && [ "$(basename "$(dirname "$pyenv")")" = bin ]; then
        PYENV_ROOT=$(dirname "$(dirname "$pyenv")")
        export PYENV_ROOT
    fi
    # `pyenv prefix 3.13` is the newest 3.13.x pyenv has; nothing when it has none.
    prefix=$(pyenv prefix "$version" 2>/dev/null || true)
    if [ -n "$prefix" ] && [ -x "$prefix/bin/python$minor" ]; then
        echo "$prefix/bin/python$minor"
        exit 0
    fi
fi
# pyenv's shims are on PATH too, and fail when their version is not selected: ask each
# candidate for its version rather than trusting its name.
if found=$(command -v "python$minor" 2>/dev/null) \
    && actual=$("$found" -c 'import platform; print(platform.python_version())' 2>/dev/null); then
    case "$actual" in
        "$version" | "$version".*)
            echo "$found"
            exit 0
            ;;
    esac
fi
echo "Python $version is not installed. Install it, then run again: with pyenv," \
    "\`pyenv install $version\`; on Debian or Ubuntu, \`apt-get install python$minor" \
    "python$minor-venv\` (where the release has it)." >&2
exit 1
