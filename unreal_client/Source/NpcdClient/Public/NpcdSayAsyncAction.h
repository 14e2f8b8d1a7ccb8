#pragma once

#include "CoreMinimal.h"
#include "Kismet/BlueprintAsyncActionBase.h"
#include "NpcdSubsystem.h"
#include "NpcdSayAsyncAction.generated.h"

DECLARE_DYNAMIC_MULTICAST_DELEGATE_ThreeParams(FNpcdTextDelta, const FString&, RequestId, const FString&, Text, const FString&, FullText);
DECLARE_DYNAMIC_MULTICAST_DELEGATE_ThreeParams(FNpcdLineFinished, const FString&, RequestId, const FString&, Text, int32, Reason);
DECLARE_DYNAMIC_MULTICAST_DELEGATE_ThreeParams(FNpcdLineFailed, const FString&, RequestId, int32, Code, const FString&, Message);

/**
 * "NPC Say Line": asks an NPC of a persona for a line. The pins fire on the game thread as
 * the subsystem polls: On Text Delta for each piece, then On Finished (Reason: 1 stop,
 * 2 length, 3 cancelled, 4 deadline) or On Failed (a gRPC status code; 14: the daemon is
 * unreachable).
 */
UCLASS()
class NPCDCLIENT_API UNpcdSayAsyncAction : public UBlueprintAsyncActionBase, public INpcdLineListener
{
    GENERATED_BODY()

public:
    UFUNCTION(BlueprintCallable, Category = "npcd", meta = (BlueprintInternalUseOnly = "true", WorldContext = "WorldContextObject", DisplayName = "NPC Say Line"))
    static UNpcdSayAsyncAction* SayLine(UObject* WorldContextObject, const FString& Persona, const FString& Speaker,
                                        const FString& Line, const FString& NpcId, int32 MaxTokens = 0);

    /** Ends the line early; On Finished then fires with Reason 3 (cancelled). */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    void Cancel();

    UPROPERTY(BlueprintAssignable)
    FNpcdTextDelta OnTextDelta;
    UPROPERTY(BlueprintAssignable)
    FNpcdLineFinished OnFinished;
    UPROPERTY(BlueprintAssignable)
    FNpcdLineFailed OnFailed;

    virtual void Activate() override;
    virtual void SetReadyToDestroy() override;
    virtual void OnNpcdEvent(const npcd_event& Event) override;

private:
    TWeakObjectPtr<UNpcdSubsystem> Subsystem;
    FString Persona, Speaker, Line, NpcId, RequestId, FullText;
    int32 MaxTokens = 0;
};
