"""The built-in studies: one line each (importing this module registers them)."""

from moeguard.studies import STUDIES
from moeguard.studies.attack import AttackStudy
from moeguard.studies.defend import DefendEvalStudy
from moeguard.studies.recovery import RecoveryStudy
from moeguard.studies.sweep import SweepStudy

for _study in (SweepStudy(), RecoveryStudy(), AttackStudy(), DefendEvalStudy()):
    STUDIES.add(_study.name, _study)
