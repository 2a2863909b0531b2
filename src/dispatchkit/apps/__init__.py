"""The apps that ship with dispatchkit; :mod:`dispatchkit.apps.covid` is the default."""
